"""Modular experts vs a monolithic network of equal parameter count vs MIND, over seeds.

    python -m experiments.experts --dataset mnist --seeds 0 1 2

Per seed, on the same task sequence: (1) the expert pool
(``modkd_jax.methods.experts``: similarity routing, specialization-driven
allocation); (2) a monolithic MLP (one batch norm, all class blocks in one
head) whose width makes its parameter count equal to the pool's (experts +
projection + prototypes), trained by fine-tuning: each task in turn, cross-
entropy on the task's own class block, nothing protecting earlier tasks; TIL =
argmax over the true block, CIL = argmax over all seen blocks; (3) MIND through
``experiments.mind.run`` with the monolithic width (same budget up to its
per-task batch norm rows). Then the knowledge-preservation protocol: an older,
narrower MLP trained on task 0 is deprecated into the expert architecture
(copy by magnitude, copy by Fisher, distillation, nothing) and task 1 is
learnt; what is retained of task 0 is measured.

FLOPs per prediction are matmul FLOPs counted analytically (2 per multiply-
add; norms, biases, ReLUs excluded): experts = router (projection + cosines to
all stored prototypes) + the experts activated (measured); monolithic = one
forward; MIND = one forward (TIL) or all T sub-networks, run densely (CIL).
Significance: Welch's t-test (scipy) across seeds, experts vs each other
method. The workdir holds config.json, metrics.jsonl, results.json, PNGs, one
JSON per finished (method, seed) and MIND's own run directories; re-running the
same command skips what is finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import mind as mind_cli
from experiments.common import UsageError, add_data_flags, guarded, show_progress
from modkd_jax import data, masks, metrics, models, rundir, training
from modkd_jax.data import batching
from modkd_jax.methods import experts as X
from modkd_jax.methods.mind import block_size_of

METHODS = ("experts", "monolithic", "mind")

DEFAULTS = {
    "mnist": dict(task_count=5, epochs=2, batch_size=128, lr=0.001, hidden=(128, 128), embed_dim=128, prototypes=20,
                  old_hidden=(64, 64)),
    "fashion_mnist": dict(task_count=5, epochs=2, batch_size=128, lr=0.001, hidden=(128, 128), embed_dim=128,
                          prototypes=20, old_hidden=(64, 64)),
    "digits": dict(task_count=5, epochs=20, batch_size=32, lr=0.001, hidden=(32, 32), embed_dim=32, prototypes=8,
                   old_hidden=(16, 16)),
}
MIND_LR = {"digits": (0.001, 0.005), "mnist": (0.001, 0.005), "fashion_mnist": (0.001, 0.005)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, default_dataset="mnist")
    p.add_argument("--scenario", default="class_split", choices=("class_split", "permuted"))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: --seed alone)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--task_count", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (MIND: teacher and distillation each)")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="widths of one expert MLP")
    p.add_argument("--max_experts", type=int, default=0, help="pool capacity (0: one per task)")
    p.add_argument("--embed_dim", type=int, default=None, help="random projection width (0: raw pixels)")
    p.add_argument("--prototypes", type=int, default=None, help="k-means prototypes per task")
    p.add_argument("--allocation", default="entropy", choices=X.ALLOCATIONS)
    p.add_argument("--reuse_threshold", type=float, default=0.5,
                   help="share of a new task's inputs that must fit an expert for it to be reused")
    p.add_argument("--max_entropy", type=float, default=math.log(2.0),
                   help="specialization ceiling H (nats) of a reused expert (default ln 2)")
    p.add_argument("--top_k", type=int, default=2, help="experts one task may reuse (soft top-k mixture)")
    p.add_argument("--radius_quantile", type=float, default=0.1)
    p.add_argument("--no_preserve", action="store_true", help="skip the knowledge-preservation protocol")
    p.add_argument("--old_hidden", type=int, nargs="+", default=None, help="widths of the deprecated model")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each deprecated kernel kept by importance")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--workdir", default=None)
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting (flags over per-dataset defaults), as saved in config.json."""
    if args.dataset not in DEFAULTS:
        raise UsageError(f"experiments.experts supports {', '.join(DEFAULTS)}, not {args.dataset}")
    d = DEFAULTS[args.dataset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    for name in ("task_count", "epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    try:
        ecfg = X.ExpertsConfig(hidden=tuple(pick("hidden")), max_experts=args.max_experts, embed_dim=pick("embed_dim"),
                               prototypes=pick("prototypes"), allocation=args.allocation,
                               reuse_threshold=args.reuse_threshold, max_entropy=args.max_entropy, top_k=args.top_k,
                               radius_quantile=args.radius_quantile, epochs=pick("epochs"),
                               batch_size=pick("batch_size"), lr=pick("lr"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not 0.0 < args.keep <= 1.0:
        raise UsageError(f"--keep must lie in (0, 1], got {args.keep}")
    seeds = args.seeds if args.seeds is not None else [args.seed]
    return dict(dataset=args.dataset, scenario=args.scenario, task_count=pick("task_count"), seeds=list(seeds),
                methods=list(dict.fromkeys(args.methods)), val_fraction=args.val_fraction,
                experts=dataclasses.asdict(ecfg), preserve=not args.no_preserve,
                old_hidden=list(pick("old_hidden")), keep=args.keep)


def build_scenario(cfg: dict, seed: int, data_dir=None, tfds_dir=None) -> data.Scenario:
    """The task sequence of one seed (class order / permutations drawn from it)."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        return data.build(cfg["scenario"], ds, cfg["task_count"], seed=seed, val_fraction=cfg["val_fraction"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def experts_config(cfg: dict) -> X.ExpertsConfig:
    return X.ExpertsConfig(**{**cfg["experts"], "hidden": tuple(cfg["experts"]["hidden"])})


# --- Parameter budget and compute ----------------------------------------------------------------


def mlp_params(hidden, num_outputs: int, num_tasks: int, input_shape) -> int:
    """Parameter count of ``models.MLP`` (shapes only, nothing initialised)."""
    model = models.build("mlp", num_outputs, num_tasks, hidden=tuple(hidden))
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), tuple(input_shape))[0])
    return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def pool_params(ecfg: X.ExpertsConfig, scenario: data.Scenario) -> dict[str, int]:
    """Stored parameters of the expert pool: experts, projection, prototypes (+ radii)."""
    T, k = scenario.task_count, block_size_of(scenario)
    in_dim = int(np.prod(scenario.input_shape))
    E = ecfg.max_experts or T
    d = ecfg.embed_dim or in_dim
    out = {"experts": E * mlp_params(ecfg.hidden, k * T, T, scenario.input_shape),
           "projection": in_dim * ecfg.embed_dim, "prototypes": T * ecfg.prototypes * d + T}
    out["total"] = sum(out.values())
    return out


def matched_width(target: int, depth: int, num_outputs: int, num_tasks: int, input_shape) -> int:
    """The width ``w`` whose ``depth``-layer MLP ``(w,) * depth`` has the parameter count closest to ``target``."""
    lo, hi = 1, 8192
    while lo < hi:
        mid = (lo + hi) // 2
        if mlp_params((mid,) * depth, num_outputs, num_tasks, input_shape) < target:
            lo = mid + 1
        else:
            hi = mid
    cands = [w for w in (lo - 1, lo) if w >= 1]
    return min(cands, key=lambda w: abs(mlp_params((w,) * depth, num_outputs, num_tasks, input_shape) - target))


# --- Monolithic fine-tuning ----------------------------------------------------------------------


def _one_bn(model):
    """``apply`` of a one-batch-norm network (row 0 whatever the task)."""

    def apply(variables, x, task=0, train=False, **kwargs):
        return model.apply(variables, x, 0, train=train, **kwargs)

    return apply


def run_monolithic(cfg: dict, scenario: data.Scenario, width: int, seed: int, log, progress: bool) -> dict:
    """Fine-tune one MLP ``(width,) * depth`` over the task sequence; accuracy matrices per rule."""
    ecfg = experts_config(cfg)
    T, k = scenario.task_count, block_size_of(scenario)
    model = models.build("mlp", k * T, 1, hidden=(width,) * len(ecfg.hidden))
    apply = _one_bn(model)
    mean, std = (tuple(float(v) for v in a) for a in scenario.norm)
    tx = training.make_optimizer("adam", ecfg.lr)
    step = training.make_train_step(training.StepSpec(apply, k, mean, std, loss="ce"), tx)
    mean_a, std_a = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(variables, x, y, valid, task, seen):
        logits = apply(variables, batching.to_float(x, mean_a, std_a), 0, train=False)
        til = jnp.argmax(training.block(logits, task, k), -1) == y
        cil = jnp.argmax(jnp.where(jnp.arange(k * T) < seen * k, logits, -jnp.inf), -1) == task * k + y
        return jnp.sum(valid & til), jnp.sum(valid & cil)

    key = jax.random.key(seed)
    params, batch_stats = models.init(model, jax.random.fold_in(key, 0), scenario.input_shape)
    full = masks.full_mask(params)
    R = {r: np.full((T, T), np.nan) for r in ("til", "cil")}
    for t, task in enumerate(scenario.tasks):
        carry = (params, batch_stats, tx.init(params))
        params, batch_stats, _ = training.run_phase(
            step, carry, task.train, epochs=ecfg.epochs, batch_size=ecfg.batch_size, base_lr=ecfg.lr,
            milestone=ecfg.lr_milestone, key=jax.random.fold_in(key, t + 1), task=t, fwd_mask=full, trn_mask=full,
            desc=f"monolithic task {t}", progress=progress,
            log=lambda m, t=t: log({"method": "monolithic", "seed": seed, "task": t, "phase": "train", **m}))
        variables = {"params": params, "batch_stats": batch_stats}
        for j, other in enumerate(scenario.tasks):
            tot = np.zeros(2)
            for x, y, v in training.pad_batches(other.test.x, other.test.y, ecfg.eval_batch_size):
                tot += np.asarray(counts(variables, x, y, v, jnp.int32(j), jnp.int32(t + 1)), float)
            R["til"][t, j], R["cil"][t, j] = tot / len(other.test)
        log({"method": "monolithic", "seed": seed, "task": t, "phase": "summary",
             "til_avg": metrics.average_accuracy(R["til"], t), "cil_avg": metrics.average_accuracy(R["cil"], t)})
    return {"accuracy_matrix": R, "width": width, "params": models.param_count(params)}


# --- Experts -------------------------------------------------------------------------------------


def run_experts(cfg: dict, scenario: data.Scenario, seed: int, log, progress: bool) -> dict:
    """The expert pool over the task sequence: accuracy, routing and specialization after every task."""
    ecfg = experts_config(cfg)
    ex = X.setup(ecfg, scenario)
    T = scenario.task_count
    state = X.init_state(ex, jax.random.key(seed))
    R = {r: np.full((T, T), np.nan) for r in ("til", "cil", "routing", "task_id", "activated")}
    infos = []
    tests = [task.test for task in scenario.tasks]
    for t in range(T):
        state, info = X.learn_task(ex, state, t, jax.random.fold_in(jax.random.key(seed), t + 1),
                                   log=lambda m: log({"method": "experts", "seed": seed, **m}), progress=progress)
        accs = X.evaluate(ex, state, tests, seen=t + 1)
        for r in R:
            R[r][t] = accs[r]
        info["specialization_per_task"] = info["specialization"]  # H(theta_i) after task t, per expert i
        infos.append(info)
        log({"method": "experts", "seed": seed, "task": t, "phase": "summary", **info,
             "til_avg": metrics.average_accuracy(R["til"], t), "cil_avg": metrics.average_accuracy(R["cil"], t),
             "routing_avg": metrics.average_accuracy(R["routing"], t)})
    in_dim = int(np.prod(scenario.input_shape))
    k = ex.block_size
    expert_flops = X.mlp_flops(in_dim, ecfg.hidden, k * T)
    # cross-check of the analytic count with XLA's on one expert's forward pass (batch 1)
    one = X.take({"params": state["params"], "batch_stats": state["batch_stats"]}, 0)
    xla = X.compiled_flops(lambda v, x: ex.model.apply(v, x, 0, train=False), one,
                           jnp.zeros((1, *scenario.input_shape), jnp.float32))
    activated = float(np.nanmean(R["activated"][-1]))
    membership = np.asarray(state["router"]["membership"])
    til_activated = float(np.mean(membership.sum(0)))
    router = X.router_flops(in_dim, ecfg.embed_dim, T * ecfg.prototypes)
    flops = {"cil": router + activated * expert_flops,
             "til": til_activated * expert_flops + (router if til_activated > 1 else 0),
             "expert_forward": expert_flops, "router": router, "xla_expert_forward": xla}
    return {"accuracy_matrix": R, "infos": infos, "flops": flops, "activated_cil": activated,
            "membership": membership, "routing_counts": np.asarray(state["counts"]),
            "params": pool_params(ecfg, scenario)}


# --- MIND ----------------------------------------------------------------------------------------


def run_mind(cfg: dict, width: int, seed: int, workdir: Path, data_dir, tfds_dir, progress: bool) -> dict:
    """MIND with the monolithic width, through ``experiments.mind.run`` (its own resumable run directory)."""
    ecfg = experts_config(cfg)
    argv = ["--dataset", cfg["dataset"], "--scenario", cfg["scenario"], "--task_count", str(cfg["task_count"]),
            "--epochs", str(ecfg.epochs), "--distill_epochs", str(ecfg.epochs), "--batch_size", str(ecfg.batch_size),
            "--seed", str(seed), "--val_fraction", str(cfg["val_fraction"]), "--arch", "mlp"]
    lr, dlr = MIND_LR[cfg["dataset"]]
    argv += ["--lr", str(lr), "--distill_lr", str(dlr)]
    mcfg = mind_cli.resolve_config(mind_cli.parser().parse_args(argv))
    mcfg["mind"]["hidden"] = [width] * len(ecfg.hidden)
    res = mind_cli.run(mcfg, workdir, data_dir=data_dir, tfds_dir=tfds_dir, progress=progress, echo=lambda *_: None)
    return {"accuracy_matrix": {r: np.asarray(res["accuracy_matrix"][r], float) for r in ("til", "cil")},
            "task_id": np.asarray(res["task_id_matrix"], float), "width": width, "params": res["params"]["student"]}


# --- Knowledge preservation ----------------------------------------------------------------------


def run_preservation(cfg: dict, scenario: data.Scenario, seed: int, progress: bool) -> dict:
    """Deprecate a narrower MLP trained on task 0 into the expert architecture, then learn task 1."""
    ecfg = experts_config(cfg)
    T, k = scenario.task_count, block_size_of(scenario)
    if T < 2:
        return {}
    mean, std = (tuple(float(v) for v in a) for a in scenario.norm)
    old = models.build("mlp", k * T, T, hidden=tuple(cfg["old_hidden"]))
    new = models.build("mlp", k * T, T, hidden=tuple(ecfg.hidden))
    key = jax.random.key(seed)
    params, batch_stats = models.init(old, jax.random.fold_in(key, 100), scenario.input_shape)
    tx = training.make_optimizer("adam", ecfg.lr)
    full = masks.full_mask(params)
    params, batch_stats, _ = training.run_phase(
        training.make_train_step(training.StepSpec(old.apply, k, mean, std, loss="ce"), tx),
        (params, batch_stats, tx.init(params)), scenario.tasks[0].train, epochs=ecfg.epochs,
        batch_size=ecfg.batch_size, base_lr=ecfg.lr, milestone=ecfg.lr_milestone, key=jax.random.fold_in(key, 101),
        task=0, fwd_mask=full, trn_mask=full, desc="old model", progress=progress)
    old_vars = {"params": params, "batch_stats": batch_stats}
    out = {}
    for name, method, imp in (("none", "none", "magnitude"), ("copy_magnitude", "copy", "magnitude"),
                              ("copy_fisher", "copy", "fisher"), ("distill", "distill", "magnitude")):
        info = X.preserve(old, old_vars, new, scenario, jax.random.fold_in(key, 102), method=method,
                          importance_kind=imp, keep=cfg["keep"], epochs=ecfg.epochs, batch_size=ecfg.batch_size,
                          lr=ecfg.lr, progress=progress)
        info.pop("plan")
        out[name] = info
    return out


# --- Aggregation ---------------------------------------------------------------------------------


def summarize_unit(unit: dict) -> dict:
    """Final TIL/CIL accuracy and forgetting of one (method, seed) result."""
    R = unit["accuracy_matrix"]
    out = {}
    for r in ("til", "cil"):
        M = np.asarray(R[r], float)
        out[f"{r}_acc"] = metrics.average_accuracy(M)
        out[f"{r}_forgetting"] = metrics.forgetting(M)
    if "routing" in R:
        out["routing_acc"] = metrics.average_accuracy(np.asarray(R["routing"], float))
    return out


def final_table(results: dict) -> str:
    """Mean +- std over seeds per method, and Welch p-values of experts vs the others."""
    agg, tests = results["aggregate"], results["welch"]
    cols = (("til_acc", "TIL %", 100), ("cil_acc", "CIL %", 100), ("til_forgetting", "TIL fgt", 100),
            ("cil_forgetting", "CIL fgt", 100), ("flops_cil", "FLOPs/pred CIL", 1), ("flops_til", "FLOPs/pred TIL", 1),
            ("activated", "experts run", 1), ("routing_acc", "routing/task-id %", 100), ("params", "params", 1))
    lines = ["", "method | " + " | ".join(c[1] for c in cols), "---|" + "---|" * len(cols)]
    for m, stats in agg.items():
        cells = []
        for key, _, scale in cols:
            s = stats.get(key)
            if s is None or s["mean"] is None or not np.isfinite(s["mean"]):
                cells.append("-")
            elif scale == 100:
                cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
            elif key.startswith("flops"):
                cells.append(f"{s['mean'] / 1e6:.3f}M")
            elif key == "params":
                cells.append(f"{s['mean'] / 1e3:.0f}k")
            else:
                cells.append(f"{s['mean']:.2f}")
        lines.append(f"{m} | " + " | ".join(cells))
    for other, t in tests.items():
        ps = ", ".join(f"{k} p={v['p']:.3g}" for k, v in t.items() if np.isfinite(v["p"]))
        lines.append(f"Welch t-test experts vs {other}: {ps or 'n/a (needs 2+ seeds with variance)'}")
    return "\n".join(lines)


def aggregate(units: dict, cfg: dict) -> tuple[dict, dict]:
    """Per method: mean/std/values over seeds of every summary number; Welch tests experts vs the others."""
    per: dict[str, dict[str, list]] = {}
    for (method, seed), unit in sorted(units.items()):
        row = summarize_unit(unit)
        T = cfg["task_count"]
        if method == "experts":
            row.update(flops_cil=unit["flops"]["cil"], flops_til=unit["flops"]["til"], activated=unit["activated_cil"],
                       params=unit["params"]["total"])
        else:
            f = X.mlp_flops(unit["input_dim"], (unit["width"],) * unit["depth"], unit["num_outputs"])
            row.update(flops_til=f, flops_cil=f * (T if method == "mind" else 1), params=unit["params"],
                       activated=float("nan"))
            if method == "mind":
                row["routing_acc"] = metrics.average_accuracy(np.asarray(unit["task_id"], float))
        for k, v in row.items():
            per.setdefault(method, {}).setdefault(k, []).append(v)
    order = [m for m in cfg["methods"] if m in per]
    per = {m: per[m] for m in order}
    agg = {m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                   "values": v} for k, v in d.items()} for m, d in per.items()}
    tests = {}
    if "experts" in per:
        for other in per:
            if other != "experts":
                tests[other] = {k: dict(zip(("t", "p"), metrics.welch(per["experts"][k], per[other][k])))
                                for k in ("til_acc", "cil_acc", "til_forgetting", "cil_forgetting")}
    return agg, tests


def plot_specialization(path: Path, unit: dict, title: str = "") -> None:
    """PNG: p(task j | expert i) from the final routing statistics, and H(theta_i) per expert after every task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = np.asarray(unit["routing_counts"], float)
    P = C / np.maximum(C.sum(1, keepdims=True), 1e-9)
    H = np.asarray([np.asarray(i["specialization"], float) for i in unit["infos"]])  # (after task t, expert i)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    im = a.imshow(P, vmin=0, vmax=1, cmap="viridis")
    a.set_xlabel("task j")
    a.set_ylabel("expert i")
    a.set_title("p(task j | expert i), routing statistics")
    fig.colorbar(im, ax=a, fraction=0.046)
    for i in range(H.shape[1]):
        if np.isfinite(H[:, i]).any():
            b.plot(np.arange(1, len(H) + 1), H[:, i], marker="o", label=f"expert {i}")
    b.set_xlabel("after task")
    b.set_ylabel("H(theta_i) [nats]")
    b.set_title("specialization entropy")
    b.legend(fontsize=7)
    fig.suptitle(title)
    rundir.save_figure(fig, path)


# --- Driver --------------------------------------------------------------------------------------


def _unit_path(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "units" / f"{method}_s{seed}.json"


def _drop_metrics(workdir: Path, method: str, seed: int) -> None:
    """Remove metric lines an interrupted (method, seed) left behind, before running it again."""
    rundir.filter_metrics(workdir, lambda rec: not (rec.get("method") == method and rec.get("seed") == seed))


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False, echo=print) -> dict:
    """Run (or finish) every (method, seed) of the comparison; returns the results written to results.json."""
    scenarios = {seed: build_scenario(cfg, seed, data_dir, tfds_dir) for seed in cfg["seeds"]}
    try:
        ecfg = experts_config(cfg)
        for sc in scenarios.values():
            block_size_of(sc)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    workdir = rundir.open_run(workdir, cfg)
    (workdir / "units").mkdir(exist_ok=True)
    log = lambda rec: rundir.log_metrics(workdir, rec)  # noqa: E731
    units: dict[tuple[str, int], dict] = {}
    preservation = {}
    for seed, scenario in scenarios.items():
        T, k = scenario.task_count, block_size_of(scenario)
        budget = pool_params(ecfg, scenario)["total"]
        width = matched_width(budget, len(ecfg.hidden), k * T, 1, scenario.input_shape)
        shape = {"input_dim": int(np.prod(scenario.input_shape)), "depth": len(ecfg.hidden), "num_outputs": k * T}
        for method in cfg["methods"] + (["preservation"] if cfg["preserve"] else []):
            path = _unit_path(workdir, method, seed)
            if path.exists():
                unit = json.loads(path.read_text())
            else:
                t0 = time.perf_counter()
                _drop_metrics(workdir, method, seed)
                if method == "experts":
                    unit = run_experts(cfg, scenario, seed, log, progress)
                elif method == "monolithic":
                    unit = {**run_monolithic(cfg, scenario, width, seed, log, progress), **shape}
                elif method == "mind":
                    unit = {**run_mind(cfg, width, seed, workdir / f"mind_s{seed}", data_dir, tfds_dir, progress),
                            **shape}
                else:
                    unit = {"variants": run_preservation(cfg, scenario, seed, progress)}
                    log({"method": "preservation", "seed": seed, "phase": "summary", **unit["variants"]})
                unit["seconds"] = time.perf_counter() - t0
                rundir.write_json(path, unit)
                unit = json.loads(path.read_text())
                echo(f"seed {seed} {method}: {unit['seconds']:.1f}s" + (
                    "" if method == "preservation" else
                    "  " + "  ".join(f"{k} {100 * v:.2f}" for k, v in summarize_unit(unit).items())))
            if method == "preservation":
                preservation[seed] = unit
            else:
                units[(method, seed)] = unit
    agg, tests = aggregate(units, cfg)
    pres = {}
    for seed, p in preservation.items():
        for name, info in p["variants"].items():
            for key in ("old_acc", "transferred_acc", "retained_acc", "new_task_acc", "retained_fraction"):
                pres.setdefault(name, {}).setdefault(key, []).append(info[key])
    pres = {n: {k: {"mean": float(np.mean(v)), "values": v} for k, v in d.items()} for n, d in pres.items()}
    results = {"config": cfg, "aggregate": agg, "welch": tests, "preservation": pres,
               "units": {f"{m}_s{s}": u for (m, s), u in units.items()},
               "preservation_per_seed": preservation}
    rundir.write_json(workdir / "results.json", results)
    s0 = cfg["seeds"][0]
    mats = {f"{m} {r.upper()}": units[(m, s0)]["accuracy_matrix"][r] for m in cfg["methods"] for r in ("til", "cil")
            if (m, s0) in units}
    if ("experts", s0) in units:
        mats["experts routing"] = units[("experts", s0)]["accuracy_matrix"]["routing"]
        plot_specialization(workdir / "specialization.png", units[("experts", s0)], title=f"seed {s0}")
    rundir.plot_matrices(workdir / "accuracy_matrices.png", mats,
                         title=f"{cfg['dataset']} {cfg['scenario']}, seed {s0}")
    table = final_table(results)
    if pres:
        table += "\npreservation (task 0 acc: old model / right after transfer / after learning task 1; task 1 acc):"
        for n, d in pres.items():
            table += (f"\n  {n}: {100 * d['old_acc']['mean']:.2f} / {100 * d['transferred_acc']['mean']:.2f} / "
                      f"{100 * d['retained_acc']['mean']:.2f}; {100 * d['new_task_acc']['mean']:.2f}")
    echo(table)
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
