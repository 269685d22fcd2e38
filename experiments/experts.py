"""Modular experts vs a monolithic network of equal parameter count vs MIND, over seeds.

    python -m experiments.experts --dataset mnist --seeds 0 1 2

Per seed, on the same task sequence, three learners through ``modkd_jax.loop``:
(1) the expert pool (``modkd_jax.methods.experts``: similarity routing,
specialization-driven allocation); (2) a monolithic MLP whose width makes its
parameter count equal to the pool's (experts + projection + prototypes),
fine-tuned task after task with CE on the task's own class block
(``baselines`` ``finetune``, ``head="task"``: one batch norm, nothing protecting
earlier tasks; TIL = argmax over the true block, CIL = over all seen blocks);
(3) MIND with the monolithic width (same budget up to its per-task batch-norm
rows). Then the knowledge-preservation protocol: an older, narrower MLP trained
on task 0 is deprecated into the expert architecture (copy by magnitude, copy
by Fisher, distillation, nothing) and task 1 is learnt; what is retained of
task 0 is measured.

FLOPs per prediction are matmul FLOPs counted analytically (2 per multiply-
add; norms, biases, ReLUs excluded): experts = router (projection + cosines to
all stored prototypes) + the experts activated (measured); monolithic = one
forward; MIND = one forward (TIL) or all T sub-networks, run densely (CIL).
Significance: Welch's t-test (scipy) across seeds, experts vs each other
method. The workdir holds config.json, results.json, PNGs, one run directory
per (method, seed) (``<method>_s<seed>``: the loop's config, metrics, results
and one checkpoint per task) and ``preservation_s<seed>.json``; re-running the
same command resumes each unit after its last finished task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (UsageError, add_config_flags, add_inference_flags, add_run_flags, build_scenario,
                                config_from, config_of, guarded, inference_from, preset_for, run_settings,
                                show_progress)
from modkd_jax import loop, masks, metrics, models, preservation, rundir, training
from modkd_jax.methods import baselines, mind
from modkd_jax.methods import experts as X
from modkd_jax.methods.experts_cost import mlp_flops, mlp_params, pool_params
from modkd_jax.methods.kit import Context, block_size_of, make_loss, norm_of, train_phase

METHODS = ("experts", "monolithic", "mind")
FLAGS = tuple(f.name for f in dataclasses.fields(X.ExpertsConfig) if f.name != "inference")
HELP = {"hidden": "widths of one expert MLP", "max_experts": "pool capacity (0: one per task)",
        "embed_dim": "random projection width (0: raw pixels)", "prototypes": "k-means prototypes per task",
        "reuse_threshold": "share of a new task's inputs that must fit an expert for it to be reused",
        "max_entropy": "specialization ceiling H (nats) of a reused expert (default ln 2)",
        "top_k": "experts one task may reuse (soft top-k mixture)",
        "epochs": "epochs per task (MIND: teacher and distillation each)",
        "old_hidden": "widths of the deprecated model", "keep": "share of each deprecated kernel kept by importance"}
CHOICES = {"allocation": X.ALLOCATIONS, "optimizer": training.OPTIMIZERS}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p, default_dataset="mnist", augment=False)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: --seed alone)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no_preserve", action="store_true", help="skip the knowledge-preservation protocol")
    add_config_flags(p, X.ExpertsConfig, FLAGS, HELP, CHOICES)
    add_inference_flags(p, skip=("prototypes",))  # the experts' router keeps its own --prototypes
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting (ExpertsConfig defaults < dataset preset < flags), as saved in config.json."""
    preset = preset_for(X.PRESETS, args.dataset, "experiments.experts")
    cfg = run_settings(args, preset)
    cfg.pop("seed")
    ecfg = config_from(X.ExpertsConfig, preset, args, FLAGS,
                       inference=inference_from(args, X.preset_config(args.dataset).inference, skip=("prototypes",)))
    return {**cfg, "seeds": list(args.seeds if args.seeds is not None else [args.seed]),
            "methods": list(dict.fromkeys(args.methods)), "preserve": not args.no_preserve,
            "experts": dataclasses.asdict(ecfg)}


def matched_width(target: int, depth: int, num_outputs: int, num_tasks: int, input_shape) -> int:
    """The width ``w`` whose ``depth``-layer MLP ``(w,) * depth`` has the parameter count closest to ``target``."""
    count = lambda w: mlp_params((w,) * depth, num_outputs, num_tasks, input_shape)  # noqa: E731
    lo, hi = 1, 8192
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    return min((w for w in (lo - 1, lo) if w >= 1), key=lambda w: abs(count(w) - target))


def unit_learner(method: str, ecfg: X.ExpertsConfig, dataset: str, scenario, width: int):
    """``(learner, its config dict)`` of one method: the pool, the matched monolithic MLP or MIND."""
    hidden = (width,) * len(ecfg.hidden)
    if method == "experts":
        return X.learner(ecfg, scenario), {"experts": dataclasses.asdict(ecfg)}
    if method == "monolithic":
        bcfg = baselines.BaselineConfig(method="finetune", head="task", arch="mlp", hidden=hidden, epochs=ecfg.epochs,
                                        batch_size=ecfg.batch_size, lr=ecfg.lr, lr_milestone=ecfg.lr_milestone,
                                        optimizer=ecfg.optimizer, crop_flip=False,
                                        eval_batch_size=ecfg.eval_batch_size)
        return baselines.learner(bcfg, scenario), {"baseline": dataclasses.asdict(bcfg)}
    mcfg = mind.preset_config(dataset, arch="mlp", hidden=hidden, epochs=ecfg.epochs, distill_epochs=ecfg.epochs,
                              batch_size=ecfg.batch_size, inference=ecfg.inference)
    return mind.learner(mcfg, scenario), {"mind": dataclasses.asdict(mcfg)}


# --- Knowledge preservation ----------------------------------------------------------------------


def run_preservation(ecfg: X.ExpertsConfig, scenario, seed: int, progress: bool) -> dict:
    """Deprecate a narrower MLP trained on task 0 into the expert architecture, then learn task 1."""
    T, k = scenario.task_count, block_size_of(scenario)
    if T < 2:
        return {}
    mean, std = norm_of(scenario)
    old = models.build("mlp", k * T, T, hidden=tuple(ecfg.old_hidden))
    new = models.build("mlp", k * T, T, hidden=tuple(ecfg.hidden))
    key = jax.random.key(seed)
    params, batch_stats = models.init(old, jax.random.fold_in(key, 100), scenario.input_shape)
    tx = training.make_optimizer("adam", ecfg.lr)
    full = masks.full_mask(params)
    step = training.make_step(make_loss(old.apply, k), tx, training.augmenting(mean, std))
    params, batch_stats, _ = train_phase(
        step, tx, params, batch_stats, scenario.tasks[0].train, Context(jnp.int32(0), full, full),
        training.Phase(ecfg.epochs, ecfg.batch_size, ecfg.lr, ecfg.lr_milestone), jax.random.fold_in(key, 101),
        task=0, name="old model", desc="old model", progress=progress)
    out = {}
    for name, method, imp in (("none", "none", "magnitude"), ("copy_magnitude", "copy", "magnitude"),
                              ("copy_fisher", "copy", "fisher"), ("distill", "distill", "magnitude")):
        info = preservation.preserve(old, {"params": params, "batch_stats": batch_stats}, new, scenario,
                                     jax.random.fold_in(key, 102), method=method, importance_kind=imp, keep=ecfg.keep,
                                     epochs=ecfg.epochs, batch_size=ecfg.batch_size, lr=ecfg.lr, progress=progress)
        info.pop("plan")
        out[name] = info
    return out


# --- Aggregation ---------------------------------------------------------------------------------


def summarize_unit(method: str, res: dict, input_dim: int) -> dict:
    """The summary numbers of one (method, seed) results.json: accuracy, forgetting, FLOPs, params."""
    R = {r: np.asarray(m, float) for r, m in res["accuracy_matrix"].items()}
    out = {}
    for r in ("til", "cil"):
        out[f"{r}_acc"], out[f"{r}_forgetting"] = metrics.average_accuracy(R[r]), metrics.forgetting(R[r])
    if method == "experts":
        f = res["flops"]
        activated = metrics.average_accuracy(R["activated"])
        out.update(routing_acc=metrics.average_accuracy(R["routing"]), activated=activated,
                   flops_cil=f["inference"] + activated * f["expert_forward"], flops_til=f["til"],
                   params=res["params"]["total"])
        return out
    sc, key = res["config"], ("mind" if method == "mind" else "baseline")
    T, shape = len(res["tasks"]), sc[key]["hidden"]
    classes = sum(len(c) for c in res["classes"])
    f = mlp_flops(input_dim, shape, classes)
    out.update(flops_til=f, flops_cil=f * (T if method == "mind" else 1), activated=float("nan"),
               params=res["params"]["student" if method == "mind" else "model"])
    if method == "mind":  # the rule in use: the Gaussians (a multiply-add per stored float) pick one sub-network
        ti = res["task_inference"]
        rule = ti["rule_in_use"][-1]
        if rule in ("gauss_input", "prototype"):
            out["flops_cil"] = f + T * ti["bytes_per_task"][rule] / 2
    if method == "mind":
        out["routing_acc"] = metrics.average_accuracy(R["task_id"])
    return out


def aggregate(units: dict, methods, input_dim: int) -> tuple[dict, dict]:
    """Per method: mean/std/values over seeds of every summary number; Welch tests experts vs the others."""
    per: dict[str, dict[str, list]] = {}
    for (method, _), res in sorted(units.items()):
        for k, v in summarize_unit(method, res, input_dim).items():
            per.setdefault(method, {}).setdefault(k, []).append(v)
    per = {m: per[m] for m in methods if m in per}
    agg = {m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                   "values": v} for k, v in d.items()} for m, d in per.items()}
    tests = {}
    if "experts" in per:
        for other in per:
            if other != "experts":
                tests[other] = {k: dict(zip(("t", "p"), metrics.welch(per["experts"][k], per[other][k])))
                                for k in ("til_acc", "cil_acc", "til_forgetting", "cil_forgetting")}
    return agg, tests


def final_table(results: dict) -> str:
    """Mean +- std over seeds per method, Welch p-values of experts vs the others, preservation means."""
    agg, tests = results["aggregate"], results["welch"]
    cols = (("til_acc", "TIL %"), ("cil_acc", "CIL %"), ("til_forgetting", "TIL fgt"), ("cil_forgetting", "CIL fgt"),
            ("flops_cil", "FLOPs/pred CIL"), ("flops_til", "FLOPs/pred TIL"), ("activated", "experts run"),
            ("routing_acc", "routing/task-id %"), ("params", "params"))
    lines = ["", "method | " + " | ".join(c[1] for c in cols), "---|" + "---|" * len(cols)]
    for m, stats in agg.items():
        cells = []
        for key, title in cols:
            s = stats.get(key)
            if s is None or s["mean"] is None or not np.isfinite(s["mean"]):
                cells.append("-")
            elif "%" in title or "fgt" in title:
                cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
            elif key.startswith("flops"):
                cells.append(f"{s['mean'] / 1e6:.3f}M")
            else:
                cells.append(f"{s['mean'] / 1e3:.0f}k" if key == "params" else f"{s['mean']:.2f}")
        lines.append(f"{m} | " + " | ".join(cells))
    for other, t in tests.items():
        ps = ", ".join(f"{k} p={v['p']:.3g}" for k, v in t.items() if v["p"] is not None and np.isfinite(v["p"]))
        lines.append(f"Welch t-test experts vs {other}: {ps or 'n/a (needs 2+ seeds with variance)'}")
    if results["preservation"]:
        lines.append("preservation (task 0 acc: old model / right after transfer / after learning task 1; task 1 acc):")
        for n, d in results["preservation"].items():
            lines.append(f"  {n}: " + " / ".join(f"{100 * d[k]['mean']:.2f}" for k in
                                                  ("old_acc", "transferred_acc", "retained_acc"))
                         + f"; {100 * d['new_task_acc']['mean']:.2f}")
    return "\n".join(lines)


def plot_specialization(path: Path, res: dict, title: str = "") -> None:
    """PNG: p(task j | expert i) from the final routing statistics, and H(theta_i) per expert after every task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = np.asarray(res["routing_counts"], float)
    P = C / np.maximum(C.sum(1, keepdims=True), 1e-9)
    H = np.asarray([[np.nan if v is None else v for v in i["specialization"]] for i in res["task_infos"]], float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    im = a.imshow(P, vmin=0, vmax=1, cmap="viridis")
    a.set(xlabel="task j", ylabel="expert i", title="p(task j | expert i), routing statistics")
    fig.colorbar(im, ax=a, fraction=0.046)
    for i in range(H.shape[1]):
        if np.isfinite(H[:, i]).any():
            b.plot(np.arange(1, len(H) + 1), H[:, i], marker="o", label=f"expert {i}")
    b.set(xlabel="after task", ylabel="H(theta_i) [nats]", title="specialization entropy")
    b.legend(fontsize=7)
    fig.suptitle(title)
    rundir.save_figure(fig, path)


# --- Driver --------------------------------------------------------------------------------------


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False, echo=print) -> dict:
    """Run (or finish) every (method, seed) of the comparison; returns the results written to results.json."""
    ecfg = config_of(X.ExpertsConfig, cfg["experts"])
    scenarios = {s: build_scenario({**cfg, "seed": s}, data_dir, tfds_dir) for s in cfg["seeds"]}
    try:
        for sc in scenarios.values():
            block_size_of(sc)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    workdir = rundir.open_run(workdir, cfg)
    units, preservation = {}, {}
    settings = {k: cfg[k] for k in ("dataset", "scenario", "task_count", "val_fraction")}
    input_dim = int(np.prod(next(iter(scenarios.values())).input_shape))
    for seed, scenario in scenarios.items():
        T, k = scenario.task_count, block_size_of(scenario)
        width = matched_width(pool_params(ecfg, scenario)["total"], len(ecfg.hidden), k * T, 1, scenario.input_shape)
        for method in cfg["methods"]:
            unit_dir = workdir / f"{method}_s{seed}"
            done = unit_dir / "results.json"
            if done.exists() and json.loads(done.read_text())["tasks_done"] == T:
                res = json.loads(done.read_text())
            else:
                learner, unit_cfg = unit_learner(method, ecfg, cfg["dataset"], scenario, width)
                res = loop.run(learner, {**settings, "seed": seed, "method": method, **unit_cfg}, unit_dir,
                               progress=progress, echo=lambda line, m=method, s=seed: None if "\n" in line else
                               echo(f"seed {s} {m}: {line}"), title=f"{method} seed {seed}")
                res = json.loads(done.read_text())
            units[(method, seed)] = res
            summary = summarize_unit(method, res, input_dim)
            echo(f"seed {seed} {method}: {sum(res['seconds_per_task']):.1f}s  " + "  ".join(
                f"{k} {100 * v:.2f}" for k, v in summary.items() if k.endswith(("acc", "forgetting"))))
        if cfg["preserve"]:
            path = workdir / f"preservation_s{seed}.json"
            if not path.exists():
                rundir.write_json(path, run_preservation(ecfg, scenario, seed, progress))
            preservation[seed] = json.loads(path.read_text())
    agg, tests = aggregate(units, cfg["methods"], input_dim)
    pres = {}
    for seed, p in preservation.items():
        for name, info in p.items():
            for key in ("old_acc", "transferred_acc", "retained_acc", "new_task_acc", "retained_fraction"):
                pres.setdefault(name, {}).setdefault(key, []).append(info[key])
    pres = {n: {k: {"mean": float(np.mean(v)), "values": v} for k, v in d.items()} for n, d in pres.items()}
    results = {"config": cfg, "aggregate": agg, "welch": tests, "preservation": pres,
               "units": [f"{m}_s{s}" for m, s in units],
               "preservation_per_seed": preservation}
    rundir.write_json(workdir / "results.json", results)
    s0 = cfg["seeds"][0]
    mats = {f"{m} {r.upper()}": units[(m, s0)]["accuracy_matrix"][r] for m in cfg["methods"] for r in ("til", "cil")}
    if "experts" in cfg["methods"]:
        mats["experts routing"] = units[("experts", s0)]["accuracy_matrix"]["routing"]
        plot_specialization(workdir / "specialization.png", units[("experts", s0)], title=f"seed {s0}")
    rundir.plot_matrices(workdir / "accuracy_matrices.png", {k: np.asarray(v, float) for k, v in mats.items()},
                         title=f"{cfg['dataset']} {cfg['scenario']}, seed {s0}")
    echo(final_table(results))
    return results


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    seeds = "-".join(str(s) for s in cfg["seeds"])
    workdir = args.workdir or f"runs/experts_{cfg['dataset']}_{cfg['scenario']}_{cfg['task_count']}_s{seeds}"
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
