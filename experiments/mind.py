"""MIND end to end: ``python -m experiments.mind --task_count 10`` (CIFAR-100, the paper's protocol).

The workdir is the run: config.json, metrics.jsonl, results.json, accuracy
heatmaps and one orbax checkpoint per finished task. Re-running the same
command resumes after the last finished task.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import UsageError, add_data_flags, guarded, show_progress
from modkd_jax import checkpoint, data, metrics, models, rundir
from modkd_jax.methods import mind

RULES = ("til", "cil", "cil_entropy")

# Per-dataset defaults; CIFAR is the paper's protocol, the small sets use an MLP.
DEFAULTS = {
    "cifar100": dict(arch="resnet32", task_count=10, epochs=50, distill_epochs=50, batch_size=256, lr=0.005,
                     distill_lr=0.035, crop_flip=True),
    "cifar10": dict(arch="resnet32", task_count=5, epochs=50, distill_epochs=50, batch_size=256, lr=0.005,
                    distill_lr=0.035, crop_flip=True),
    "mnist": dict(arch="mlp", task_count=5, epochs=5, distill_epochs=5, batch_size=128, lr=0.001,
                  distill_lr=0.005, crop_flip=False),
    "fashion_mnist": dict(arch="mlp", task_count=5, epochs=5, distill_epochs=5, batch_size=128, lr=0.001,
                          distill_lr=0.005, crop_flip=False),
    "digits": dict(arch="mlp", task_count=5, epochs=30, distill_epochs=30, batch_size=64, lr=0.001,
                   distill_lr=0.005, crop_flip=False, hidden=(128, 128)),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.mind", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, default_dataset="cifar100")
    p.add_argument("--scenario", default="class_split", choices=("class_split", "permuted"))
    p.add_argument("--task_count", type=int, default=None, help="number of tasks (default per dataset)")
    p.add_argument("--arch", default=None, choices=models.ARCHS)
    p.add_argument("--epochs", type=int, default=None, help="teacher epochs")
    p.add_argument("--distill_epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="teacher learning rate")
    p.add_argument("--distill_lr", type=float, default=None)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--beta", type=float, default=5.0, help="weight of the Jensen-Shannon term")
    p.add_argument("--temperature", type=float, default=6.5, help="distillation and inference temperature")
    p.add_argument("--policy", default="random", choices=("random", "magnitude"))
    p.add_argument("--self_distillation", action="store_true")
    p.add_argument("--init_new", default="zero", choices=("zero", "keep"),
                   help="start newly assigned weights at zero (reference) or keep their random init")
    p.add_argument("--no_augment", action="store_true", help="disable crop+flip on CIFAR")
    p.add_argument("--val_fraction", type=float, default=0.1, help="held out from train for monitoring")
    p.add_argument("--workdir", default=None, help="run directory (default runs/mind_<dataset>_...)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting of the run (flags over per-dataset defaults), as saved in config.json."""
    d = DEFAULTS[args.dataset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    cfg = dict(dataset=args.dataset, scenario=args.scenario, seed=args.seed, val_fraction=args.val_fraction,
               task_count=pick("task_count"))
    mind_cfg = mind.MindConfig(
        arch=pick("arch"), hidden=tuple(d.get("hidden", (400, 400))), epochs=pick("epochs"),
        distill_epochs=pick("distill_epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
        distill_lr=pick("distill_lr"), optimizer=args.optimizer, beta=args.beta, temperature=args.temperature,
        policy=args.policy, self_distillation=args.self_distillation, init_new=args.init_new,
        crop_flip=d["crop_flip"] and not args.no_augment)
    if args.self_distillation and args.policy != "magnitude":
        mind_cfg = dataclasses.replace(mind_cfg, policy="magnitude")  # self-distillation keeps the largest |w|
    cfg["mind"] = dataclasses.asdict(mind_cfg)
    return cfg


def build_scenario(cfg: dict, data_dir=None, tfds_dir=None) -> data.Scenario:
    """Load the dataset and cut it into tasks; bad task counts become a UsageError."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        return data.build(cfg["scenario"], ds, cfg["task_count"], seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False,
        stop_after: int | None = None, echo=print) -> dict:
    """Run (or resume) MIND as configured; returns the results dict written to results.json.

    ``stop_after`` ends the run after that many finished tasks (to test resuming).
    """
    scenario = build_scenario(cfg, data_dir, tfds_dir)
    try:
        mind_cfg = mind.MindConfig(**{**cfg["mind"], "hidden": tuple(cfg["mind"]["hidden"])})
        method = mind.setup(mind_cfg, scenario)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    workdir = rundir.open_run(workdir, cfg)  # only once the input is known to be good
    T = scenario.task_count
    key = jax.random.key(cfg["seed"])
    init_key, task_key = jax.random.split(key)
    state = mind.init_state(method, init_key)
    R = {rule: np.full((T, T), np.nan) for rule in RULES + ("task_id",)}
    like = {"state": state, "R": R, "rng": checkpoint.key_to_array(task_key)}
    mngr = checkpoint.manager(workdir)
    start, seconds, infos = 0, [], []
    restored = checkpoint.latest(mngr, like)
    if restored is not None:
        _, ckpt, meta = restored
        state, R = ckpt["state"], {k: np.asarray(v) for k, v in ckpt["R"].items()}
        task_key = checkpoint.array_to_key(ckpt["rng"])
        start, seconds, infos = meta["next_task"], meta["seconds"], meta["infos"]
        echo(f"resuming {workdir} after task {start - 1}")
    rundir.truncate_metrics(workdir, start)
    log = lambda rec: rundir.log_metrics(workdir, rec)  # noqa: E731
    tests = [task.test for task in scenario.tasks]
    for t in range(start, T if stop_after is None else min(T, stop_after)):
        t0 = time.perf_counter()
        state, info = mind.learn_task(method, state, t, jax.random.fold_in(task_key, t), log=log, progress=progress)
        accs = mind.evaluate(method, state, tests, seen=t + 1)
        for rule in R:
            R[rule][t] = accs[rule]
        info["seconds"] = time.perf_counter() - t0
        seconds.append(info["seconds"])
        infos.append(info)
        summary = {"task": t, "phase": "summary", **info,
                   **{f"{rule}_avg": metrics.average_accuracy(R[rule], t) for rule in RULES},
                   **{f"{rule}_row": R[rule][t] for rule in RULES}}
        log(summary)
        echo(f"task {t + 1}/{T} {scenario.tasks[t].name}: TIL {100 * summary['til_avg']:.2f}%  "
             f"CIL {100 * summary['cil_avg']:.2f}%  capacity left {100 * info['capacity_left']:.1f}%  "
             f"{info['seconds']:.1f}s")
        checkpoint.save(mngr, t + 1, {"state": state, "R": R, "rng": checkpoint.key_to_array(task_key)},
                        rundir._jsonable({"next_task": t + 1, "seconds": seconds, "infos": infos}))
    done = len(seconds)
    results = {
        "method": "mind_self_distillation" if mind_cfg.self_distillation else "mind",
        "config": cfg, "tasks": [task.name for task in scenario.tasks], "tasks_done": done,
        "classes": [task.classes for task in scenario.tasks],
        "accuracy_matrix": {rule: R[rule] for rule in RULES}, "task_id_matrix": R["task_id"],
        "summary": {rule: metrics.summarize(R[rule][:done, :done]) if done else {} for rule in RULES},
        "seconds_per_task": seconds, "task_infos": infos,
        "params": {"student": models.param_count(state["params"]),
                   "teacher": models.param_count(models.init(method.teacher, jax.random.key(0),
                                                             scenario.input_shape)[0])},
    }
    rundir.write_json(workdir / "results.json", results)
    rundir.plot_matrices(workdir / "accuracy_matrices.png", {f"{rule.upper()} R[i,j]": R[rule] for rule in RULES},
                         title=f"MIND on {scenario.name}")
    if done == T:
        echo(final_table(results))
    mngr.close()
    return results


def final_table(results: dict) -> str:
    """The end-of-run table: average accuracy after each task, final forgetting, seconds."""
    R = {rule: np.asarray(results["accuracy_matrix"][rule], float) for rule in RULES}
    lines = ["", "after task | TIL avg | CIL avg | CIL (entropy) avg | seconds",
             "-----------|---------|---------|-------------------|--------"]
    for t, sec in enumerate(results["seconds_per_task"]):
        lines.append(f"{t + 1:>10} | " + " | ".join(
            f"{100 * metrics.average_accuracy(R[r], t):>{w}.2f}" for r, w in zip(RULES, (7, 7, 17))) + f" | {sec:.1f}")
    s = results["summary"]
    lines.append(f"final: TIL {100 * s['til']['average_accuracy']:.2f}% (forgetting {100 * s['til']['forgetting']:.2f}), "
                 f"CIL {100 * s['cil']['average_accuracy']:.2f}% (forgetting {100 * s['cil']['forgetting']:.2f})")
    return "\n".join(lines)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.task_count is not None and args.task_count < 1:
        raise UsageError(f"--task_count must be at least 1, got {args.task_count}")
    cfg = resolve_config(args)
    workdir = args.workdir or f"runs/mind_{cfg['dataset']}_{cfg['scenario']}_{cfg['task_count']}_s{cfg['seed']}"
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
