"""DKT end to end: ``python -m experiments.dkt --experiment agents --dataset mnist --agents 3``.

Experiments: ``joint_teacher`` (a teacher trained on every class teaches a
class-incremental student), ``continual_teacher`` (the teacher is a fine-tuning
continual learner one experience ahead, refreshed each experience) and
``agents`` (N agents, each with its own class order of the same dataset,
taking a neighbour as teacher every ``--exchange_every`` epochs over a ring or
random gossip). ``--exchange probe`` sends only logits on a held-out probe set;
``--exchange weights`` sends the model. ``--alone`` (or ``--lam 0``) is the
same run with no exchange. ``--compare`` runs alone, probe and weights side by
side in ``<workdir>/{alone,probe,weights}`` and prints the comparison table.

The workdir is the run: config.json, metrics.jsonl, results.json (per-agent
TIL/CIL matrices of both heads, bytes sent), one PNG per agent and one orbax
checkpoint per finished experience. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments.common import UsageError, add_data_flags, guarded, show_progress
from modkd_jax import checkpoint, data, metrics, models, rundir
from modkd_jax.methods import dkt

MATRICES = ("cl_til", "cl_cil", "student_til", "student_cil")

# Per-dataset defaults: small MLPs on the 28x28 / 8x8 sets, ResNet-32 features on CIFAR. Adam at 1e-4 on
# (Fashion-)MNIST: at 1e-3 it pushes the rows of old classes down at full step size (Adam normalises their
# tiny, consistent gradients) and the CL head's task-incremental accuracy falls to ~50% after 5 experiences.
DEFAULTS = {
    "mnist": dict(task_count=5, backbone="mlp", hidden=(400, 400), epochs=2, teacher_epochs=2, batch_size=128,
                  lr=1e-4, n_probe=1000, crop_flip=False),
    "fashion_mnist": dict(task_count=5, backbone="mlp", hidden=(400, 400), epochs=2, teacher_epochs=2,
                          batch_size=128, lr=1e-4, n_probe=1000, crop_flip=False),
    "digits": dict(task_count=5, backbone="mlp", hidden=(64, 64), epochs=5, teacher_epochs=5, batch_size=32,
                   lr=2e-3, n_probe=200, crop_flip=False),
    "cifar10": dict(task_count=5, backbone="resnet32", hidden=(), epochs=10, teacher_epochs=10, batch_size=128,
                    lr=1e-3, n_probe=2000, crop_flip=True),
    "cifar100": dict(task_count=10, backbone="resnet32", hidden=(), epochs=10, teacher_epochs=10, batch_size=128,
                     lr=1e-3, n_probe=2000, crop_flip=True),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.dkt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, default_dataset="mnist")
    p.add_argument("--experiment", default="agents", choices=dkt.EXPERIMENTS)
    p.add_argument("--task_count", type=int, default=None, help="experiences (default per dataset)")
    p.add_argument("--agents", type=int, default=2, help="agents in the agents experiment (>= 2)")
    p.add_argument("--exchange", default="probe", choices=dkt.MODES)
    p.add_argument("--topology", default="ring", choices=dkt.TOPOLOGIES)
    p.add_argument("--exchange_every", type=int, default=1, help="epochs between exchange rounds")
    p.add_argument("--alone", action="store_true", help="no exchange: each learner trained alone")
    p.add_argument("--compare", action="store_true", help="agents: run alone, probe and weights and tabulate")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the distillation loss")
    p.add_argument("--kd", default="kl", choices=("kl", "mse"))
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--backbone", default=None, choices=models.ARCHS)
    p.add_argument("--epochs", type=int, default=None, help="epochs per experience")
    p.add_argument("--teacher_epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--n_probe", type=int, default=None, help="probe images held out of the training pool")
    p.add_argument("--devices", type=int, default=0,
                   help="shard agents over this many devices (0: all devices when they divide --agents)")
    p.add_argument("--val_fraction", type=float, default=0.0)
    p.add_argument("--workdir", default=None, help="run directory (default runs/dkt_<experiment>_<dataset>_...)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting (flags over per-dataset defaults), as saved in config.json."""
    d = DEFAULTS[args.dataset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    if args.experiment == "agents" and args.agents < 2:
        raise UsageError(f"--agents must be at least 2 for the agents experiment, got {args.agents}")
    if pick("task_count") < 1:
        raise UsageError(f"--task_count must be at least 1, got {pick('task_count')}")
    try:
        dkt_cfg = dkt.DKTConfig(
            backbone=pick("backbone"), hidden=tuple(d["hidden"]), epochs=pick("epochs"),
            teacher_epochs=pick("teacher_epochs"), batch_size=pick("batch_size"),
            probe_batch_size=pick("batch_size"), lr=pick("lr"), lam=args.lam, kd=args.kd,
            temperature=args.temperature, exchange=args.exchange, topology=args.topology,
            exchange_every=args.exchange_every, alone=args.alone, n_probe=pick("n_probe"),
            crop_flip=d["crop_flip"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    agents = args.agents if args.experiment == "agents" else 1
    devices = args.devices or default_devices(agents)
    return dict(dataset=args.dataset, experiment=args.experiment, seed=args.seed, task_count=pick("task_count"),
                agents=agents, devices=devices, val_fraction=args.val_fraction, dkt=dataclasses.asdict(dkt_cfg))


def default_devices(agents: int) -> int:
    """All local devices when there are several and they divide the agents, else 1 (vmap on one device)."""
    n = jax.device_count()
    return n if n > 1 and agents % n == 0 else 1


def build_world(cfg: dict, data_dir=None, tfds_dir=None) -> dkt.World:
    """Load the dataset and set the run up; bad settings become a UsageError."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        dkt_cfg = dkt.DKTConfig(**{**cfg["dkt"], "hidden": tuple(cfg["dkt"]["hidden"])})
        return dkt.setup(dkt_cfg, ds, cfg["task_count"], experiment=cfg["experiment"], agents=cfg["agents"],
                         seed=cfg["seed"], devices=cfg["devices"], val_fraction=cfg["val_fraction"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False,
        stop_after: int | None = None, echo=print) -> dict:
    """Run (or resume) DKT as configured; returns the results dict written to results.json.

    ``stop_after`` ends after that many finished experiences (to test resuming).
    """
    world = build_world(cfg, data_dir, tfds_dir)
    workdir = rundir.open_run(workdir, cfg)
    A, T = world.agents, world.task_count
    state = dkt.init_state(world)
    R = {k: np.full((A, T, T), np.nan) for k in MATRICES}
    if world.experiment != "agents":
        R.update({k: np.full((1, T, T), np.nan) for k in ("teacher_til", "teacher_cil")})
    mngr = checkpoint.manager(workdir)
    start, seconds, prog = 0, [], dkt.new_progress(A)
    restored = checkpoint.latest(mngr, {"state": state, "R": R})
    if restored is not None:
        _, ckpt, meta = restored
        state = ckpt["state"]  # restored onto the shardings of the fresh state (agents mesh or one device)
        R = {k: np.asarray(v) for k, v in ckpt["R"].items()}
        start, seconds, prog = meta["next_task"], meta["seconds"], meta["progress"]
        echo(f"resuming {workdir} after experience {start - 1}")
    rundir.truncate_metrics(workdir, start)
    log = lambda rec: rundir.log_metrics(workdir, rec)  # noqa: E731
    for t in tqdm(range(start, T if stop_after is None else min(T, stop_after)), desc="experiences",
                  leave=False, disable=not progress):
        state, prog, info = dkt.learn_experience(world, state, prog, t, log=log)
        rows = dkt.evaluate(world, state, t)
        for k, v in rows.items():
            R[k][:, t] = v
        seconds.append(info["seconds"])
        summary = {"task": t, "phase": "summary", "seconds": info["seconds"], "rounds": prog["rounds"],
                   "bytes_sent": prog["bytes_sent"],
                   **{f"{k}_avg": [metrics.average_accuracy(R[k][a], t) for a in range(len(R[k]))] for k in R}}
        log(summary)
        echo(f"experience {t + 1}/{T}: CL-head CIL " + " ".join(f"{100 * v:.1f}" for v in summary["cl_cil_avg"])
             + "  student CIL " + " ".join("-" if not np.isfinite(v) else f"{100 * v:.1f}"
                                          for v in summary["student_cil_avg"])
             + f"  sent {prog['bytes_sent'][0]:,} B/agent  {info['seconds']:.1f}s")
        checkpoint.save(mngr, t + 1, {"state": state, "R": R},
                        rundir._jsonable({"next_task": t + 1, "seconds": seconds, "progress": prog}))
    mngr.close()
    results = make_results(world, cfg, R, seconds, prog)
    rundir.write_json(workdir / "results.json", results)
    for a in range(A):
        mats = {f"{k} (agent {a})": R[k][a] for k in MATRICES}
        if "teacher_cil" in R:
            mats.update({"teacher_til": R["teacher_til"][0], "teacher_cil": R["teacher_cil"][0]})
        rundir.plot_matrices(workdir / f"accuracy_matrices_agent{a}.png", mats,
                             title=f"DKT {world.experiment} ({mode_name(world.cfg)}) agent {a}")
    if results["tasks_done"] == T:
        echo(final_table(results))
    return results


def mode_name(cfg: dkt.DKTConfig) -> str:
    """``alone`` or the exchange mode."""
    return "alone" if cfg.alone or cfg.lam == 0 else cfg.exchange


def make_results(world: dkt.World, cfg: dict, R: dict, seconds: list, prog: dict) -> dict:
    """results.json: per-agent matrices and summaries of both heads, bytes exchanged, timings."""
    done = len(seconds)
    per_round = prog["bytes_sent"][0] // prog["rounds"] if prog["rounds"] else 0
    agents = []
    for a, scen in enumerate(world.scenarios):
        agents.append({
            "agent": a, "class_order_seed": dkt.order_seed(world.seed, a),
            "tasks": [t.name for t in scen.tasks], "classes": [t.classes for t in scen.tasks],
            "accuracy_matrix": {k: R[k][a] for k in MATRICES},
            "final": {k: metrics.average_accuracy(R[k][a], done - 1) if done else None for k in MATRICES},
            "summary": {k: metrics.summarize(R[k][a][:done, :done]) if done else {} for k in MATRICES},
            "bytes_sent": prog["bytes_sent"][a]})
    results = {
        "method": "dkt", "experiment": world.experiment, "mode": mode_name(world.cfg), "config": cfg,
        "tasks_done": done, "agents": agents,
        "exchange": {"mode": world.cfg.exchange, "topology": world.cfg.topology, "rounds": prog["rounds"],
                     "bytes_per_agent_per_round": per_round, "bytes_sent_per_agent": prog["bytes_sent"],
                     "bytes_total": int(sum(prog["bytes_sent"]))},
        "probe": {"n_probe": len(world.probe_x), "source": "held out of the training split (test untouched)",
                  "rows": world.probe_index},
        "seconds_per_task": seconds,
        "params_per_agent": models.param_count(
            jax.tree.map(lambda x: x[0], dkt.init_learners(world, [jax.random.key(0)])["params"])),
    }
    if "teacher_cil" in R:
        results["teacher"] = {k: R[f"teacher_{k}"][0] for k in ("til", "cil")}
        results["teacher_final"] = {k: metrics.average_accuracy(R[f"teacher_{k}"][0], done - 1) if done else None
                                    for k in ("til", "cil")}
    return results


def _pct(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def final_table(results: dict) -> str:
    """Per agent: final average accuracy of both heads (TIL / CIL), forgetting, bytes sent."""
    lines = ["", f"DKT {results['experiment']} ({results['mode']}): final average accuracy over each agent's tasks",
             "agent | CL TIL | CL CIL | CL CIL forgetting | student TIL | student CIL | bytes sent",
             "------|--------|--------|-------------------|-------------|-------------|-----------"]
    for ag in results["agents"]:
        f = ag["final"]
        lines.append(f"{ag['agent']:>5} | {_pct(f['cl_til']):>6} | {_pct(f['cl_cil']):>6} | "
                     f"{_pct(ag['summary']['cl_cil'].get('forgetting')):>17} | {_pct(f['student_til']):>11} | "
                     f"{_pct(f['student_cil']):>11} | {ag['bytes_sent']:,}")
    if "teacher_final" in results:
        t = results["teacher_final"]
        lines.append(f"teacher: TIL {_pct(t['til'])}  CIL {_pct(t['cil'])}")
    return "\n".join(lines)


def compare(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False,
            echo=print) -> dict:
    """Run the agents experiment alone, with probe exchange and with weights exchange; tabulate per agent."""
    workdir = Path(workdir)
    runs = {}
    for name in ("alone", "probe", "weights"):
        sub = {**cfg, "dkt": {**cfg["dkt"], "alone": name == "alone",
                              "exchange": "probe" if name == "alone" else name}}
        echo(f"--- {name}")
        t0 = time.perf_counter()
        runs[name] = run(sub, workdir / name, data_dir=data_dir, tfds_dir=tfds_dir, progress=progress, echo=echo)
        runs[name]["wall_seconds"] = time.perf_counter() - t0
    table = comparison_table(runs, cfg)
    rundir.write_json(workdir / "comparison.json", {
        "config": cfg, "table": table,
        "agents": {name: [ag["final"] | {"bytes_sent": ag["bytes_sent"]} for ag in r["agents"]]
                   for name, r in runs.items()},
        "wall_seconds": {name: r["wall_seconds"] for name, r in runs.items()}})
    (workdir / "comparison.md").write_text(table + "\n")
    echo(table)
    return runs


def comparison_table(runs: dict, cfg: dict) -> str:
    """Markdown: each agent's final CL-head accuracy alone vs with each exchange, student head, bytes."""
    head = (f"{cfg['dataset']}, {cfg['task_count']} experiences, {cfg['agents']} agents, "
            f"{cfg['dkt']['epochs']} epochs/experience, {cfg['dkt']['topology']}, lam {cfg['dkt']['lam']}")
    lines = [head, "",
             "| agent | CL CIL alone | CL CIL probe | CL CIL weights | CL TIL alone | CL TIL probe | CL TIL weights "
             "| student CIL probe | student CIL weights | MB sent probe | MB sent weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in range(cfg["agents"]):
        f = {n: r["agents"][a]["final"] for n, r in runs.items()}
        mb = {n: r["agents"][a]["bytes_sent"] / 1e6 for n, r in runs.items()}
        lines.append(f"| {a} | " + " | ".join(_pct(f[n]["cl_cil"]) for n in ("alone", "probe", "weights")) + " | "
                     + " | ".join(_pct(f[n]["cl_til"]) for n in ("alone", "probe", "weights")) + " | "
                     + " | ".join(_pct(f[n]["student_cil"]) for n in ("probe", "weights")) + " | "
                     + f"{mb['probe']:.2f} | {mb['weights']:.2f} |")
    mean = lambda n, k: float(np.mean([ag["final"][k] for ag in runs[n]["agents"]]))  # noqa: E731
    lines.append("| mean | " + " | ".join(_pct(mean(n, "cl_cil")) for n in ("alone", "probe", "weights")) + " | "
                 + " | ".join(_pct(mean(n, "cl_til")) for n in ("alone", "probe", "weights")) + " | "
                 + " | ".join(_pct(mean(n, "student_cil")) for n in ("probe", "weights")) + " | "
                 + f"{sum(ag['bytes_sent'] for ag in runs['probe']['agents']) / 1e6:.2f} (all) | "
                 + f"{sum(ag['bytes_sent'] for ag in runs['weights']['agents']) / 1e6:.2f} (all) |")
    return "\n".join(lines)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    if args.compare and cfg["experiment"] != "agents":
        raise UsageError("--compare is for --experiment agents")
    tag = "compare" if args.compare else ("alone" if args.alone or args.lam == 0 else args.exchange)
    workdir = args.workdir or (f"runs/dkt_{cfg['experiment']}_{cfg['dataset']}_{tag}_a{cfg['agents']}"
                               f"_s{cfg['seed']}")
    if args.compare:
        compare(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    else:
        run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
