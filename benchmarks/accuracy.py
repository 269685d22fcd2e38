"""Accuracy report: MIND, MIND self-distillation and the baselines under one protocol, over several seeds.

``python -m benchmarks.accuracy --quick`` (a few minutes on 2 CPU cores) or
``python -m benchmarks.accuracy`` (the full setting, for a GPU) runs every
method on Split MNIST (5 tasks), Split Fashion-MNIST (5 tasks) and Permuted
MNIST (10 tasks) in memory (``modkd_jax.loop.run`` with no run directory)
and writes to ``--out``:

- ``accuracy[_quick].md``: mean +- std over seeds of the final TIL / CIL
  average accuracy and forgetting per method and benchmark, then Welch's
  t-test (``scipy.stats.ttest_ind(equal_var=False)``) of MIND against the best
  baseline (by mean; joint training is the upper bound, not a competitor);
- ``accuracy[_quick].png``: average accuracy after each task (mean over seeds);
- ``accuracy[_quick].json``: the raw per-seed accuracy matrices
  (``--from_json`` re-renders the report and plot from it without training).

Every method gets the same epochs within a setting: ``epochs`` for its first
phase (MIND's teacher, the self-distillation's training, each baseline's
training, PackNet's training before pruning) and ``second_epochs`` for the
second phase where a method has one (MIND's distillation, PackNet's retraining).
Other hyperparameters are the per-dataset presets of ``modkd_jax.methods.mind``
(``PRESETS``) and ``modkd_jax.methods.baselines`` (``preset``) over the config defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

BENCHMARKS = {  # name -> (dataset, scenario, task count)
    "split_mnist": ("mnist", "class_split", 5),
    "split_fashion_mnist": ("fashion_mnist", "class_split", 5),
    "permuted_mnist": ("mnist", "permuted", 10),
}
TITLES = {"split_mnist": "Split MNIST (5 tasks)", "split_fashion_mnist": "Split Fashion-MNIST (5 tasks)",
          "permuted_mnist": "Permuted MNIST (10 tasks)"}
MIND_METHODS = ("mind", "mind_self_distillation")
BASELINES = ("finetune", "lwf", "ewc", "packnet", "joint")
METHODS = MIND_METHODS + ("experts",) + BASELINES
UPPER_BOUNDS = ("joint",)  # reported, never "the best baseline"
INFERRING = MIND_METHODS + ("experts", "packnet")  # methods that infer the task of a class-incremental input


@dataclasses.dataclass(frozen=True)
class Setting:
    """How much training and data one setting spends; identical for every method."""

    name: str
    seeds: int
    epochs: int
    second_epochs: int
    train_per_task: int | None = None  # None: the whole training split of each task
    test_per_task: int | None = None

    def describe(self) -> str:
        """One line saying exactly what this setting does."""
        data = "full train/test splits"
        if self.train_per_task or self.test_per_task:
            data = (f"{self.train_per_task or 'all'} training and {self.test_per_task or 'all'} test examples per "
                    "task (seeded random subsets)")
        return (f"`{self.name}`: {self.seeds} seeds; {self.epochs} epoch(s) of first-phase training and "
                f"{self.second_epochs} of second-phase training (MIND distillation, PackNet retraining) per task "
                f"for every method; {data}; MLP 400-400, batch 128, Adam")


SETTINGS = {
    "quick": Setting("quick", seeds=2, epochs=1, second_epochs=1, train_per_task=3000, test_per_task=1000),
    "full": Setting("full", seeds=5, epochs=5, second_epochs=5),
}


# ---------------------------------------------------------------------------------------------- one run


def subsample(scenario, train: int | None, test: int | None, seed: int):
    """The scenario with each task's train / val / test cut to seeded random subsets (None: keep all)."""
    from modkd_jax.data.scenarios import Split

    def cut(split, n, rng):
        if n is None or len(split.y) <= n:
            return split
        idx = np.sort(rng.choice(len(split.y), n, replace=False))
        return Split(split.x[idx], split.y[idx], split.y_global[idx])

    tasks = []
    for task in scenario.tasks:
        rng = np.random.default_rng([seed, task.id, 7])
        val = None if train is None else max(1, train // 10)
        tasks.append(dataclasses.replace(task, train=cut(task.train, train, rng), val=cut(task.val, val, rng),
                                         test=cut(task.test, test, rng)))
    return dataclasses.replace(scenario, tasks=tuple(tasks))


def method_config(method: str, dataset: str, setting: Setting):
    """The MindConfig or BaselineConfig of ``method``: per-dataset defaults, the setting's epochs."""
    from modkd_jax.methods import baselines, experts, from_preset, mind

    if method == "experts":  # one training phase per task
        return experts.preset_config(dataset, epochs=setting.epochs)
    if method in MIND_METHODS:
        sd = method == "mind_self_distillation"
        return mind.preset_config(dataset, epochs=setting.epochs, distill_epochs=setting.second_epochs,
                                  self_distillation=sd, policy="magnitude" if sd else "random")
    return from_preset(baselines.BaselineConfig, baselines.preset(dataset), method=method, epochs=setting.epochs,
                       retrain_epochs=setting.second_epochs)


def hyperparameters(dataset: str, setting: Setting) -> str:
    """One line of the method-specific hyperparameters the report ran with (read from the configs)."""
    m = method_config("mind", dataset, setting)
    b = method_config("ewc", dataset, setting)
    tau = "chosen on validation" if m.temperature is None else m.temperature
    return (f"MIND: teacher lr {m.lr}, distillation lr {m.distill_lr}, beta {m.beta}, L_SD {m.distill_loss} at "
            f"T {m.distill_temperature:g}, tau {tau}, "
            f"{m.policy} selection (self-distillation: magnitude); baselines: lr {b.lr}, CE over every seen class "
            f"(head={b.head}), LwF alpha {b.lwf_alpha} T {b.lwf_temperature}, EWC lambda {b.ewc_lambda:g} on "
            f"{b.ewc_samples} examples per task, PackNet keeps the largest-|w| 1/N share and uses tau "
            f"{b.temperature} for CIL")


def make_learner(method: str, config, scenario):
    """A ``modkd_jax.learner.Learner`` for ``method``."""
    from modkd_jax.methods import baselines, experts, mind

    if method == "experts":
        return experts.learner(config, scenario)
    if method in MIND_METHODS:
        return mind.learner(config, scenario)
    return baselines.learner(config, scenario)


def run_one(method: str, bench: str, seed: int, setting: Setting, data_root: Path | None, tfds_dir=None) -> dict:
    """One method on one benchmark with one seed, in memory; the accuracy matrices and summaries."""
    from modkd_jax import data, loop

    dataset, scenario_name, task_count = BENCHMARKS[bench]
    ds = data.load(dataset, data_dir=None if data_root is None else str(data_root), tfds_dir=tfds_dir)
    scenario = data.build(scenario_name, ds, task_count, seed=seed, val_fraction=0.1)
    scenario = subsample(scenario, setting.train_per_task, setting.test_per_task, seed)
    config = method_config(method, dataset, setting)
    cfg = {"dataset": dataset, "scenario": scenario_name, "task_count": task_count, "seed": seed,
           "method": method, "config": dataclasses.asdict(config)}
    start = time.perf_counter()
    res = loop.run(make_learner(method, config, scenario), cfg, None, echo=None)
    return {"method": method, "benchmark": bench, "seed": seed, "seconds": time.perf_counter() - start,
            "til": np.asarray(res["accuracy_matrix"]["til"], float).tolist(),
            "cil": np.asarray(res["accuracy_matrix"]["cil"], float).tolist(),
            "summary": {r: res["summary"][r] for r in ("til", "cil", "cil_max_prob") if r in res["summary"]},
            # task-inference methods: the paper's max-probability rule beside the rule chosen on validation
            **({"cil_max_prob": np.asarray(res["accuracy_matrix"]["cil_max_prob"], float).tolist(),
                "rule_in_use": res["task_inference"]["rule_in_use"]} if "task_inference" in res else {})}


# ---------------------------------------------------------------------------------------------- statistics


def curve(R: np.ndarray) -> np.ndarray:
    """Average accuracy over the tasks seen so far, after each task (the row means of R's lower triangle)."""
    R = np.asarray(R, float)
    return np.array([np.mean(R[i, : i + 1]) for i in range(len(R))])


def final_values(runs: list[dict], rule: str, key: str) -> np.ndarray:
    """Per-seed final ``key`` (average_accuracy / forgetting) of ``rule`` (til / cil)."""
    return np.array([r["summary"][rule][key] for r in runs], float)


def mean_std(x: np.ndarray) -> str:
    """``mean ± std`` in percent (sample std, ddof=1; a single seed shows no std)."""
    x = 100 * np.asarray(x, float)
    return f"{x.mean():.2f}" if len(x) < 2 else f"{x.mean():.2f} ± {x.std(ddof=1):.2f}"


def best_baseline(by_method: dict[str, list[dict]], rule: str) -> str | None:
    """The baseline (not an upper bound) with the highest mean final average accuracy on ``rule``."""
    scores = {m: final_values(runs, rule, "average_accuracy").mean() for m, runs in by_method.items()
              if m in BASELINES and m not in UPPER_BOUNDS and runs}
    return max(scores, key=scores.get) if scores else None



# ---------------------------------------------------------------------------------------------- report


def group(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Runs as ``{benchmark: {method: [runs over seeds]}}`` in the canonical orders."""
    out: dict[str, dict[str, list[dict]]] = {}
    for bench in BENCHMARKS:
        per = {m: [r for r in runs if r["benchmark"] == bench and r["method"] == m] for m in METHODS}
        per = {m: rs for m, rs in per.items() if rs}
        if per:
            out[bench] = per
    return out


def markdown(runs: list[dict], setting: Setting, command: str, header: str) -> str:
    """The report: one table per benchmark, then MIND vs the best baseline (Welch's t-test)."""
    from modkd_jax import metrics

    lines = ["# Accuracy: MIND vs baselines", "", f"Command: `{command}`  ", header + "  ",
             f"Setting {setting.describe()}.  ", f"Hyperparameters: {hyperparameters('mnist', setting)}.", "",
             ("Final average accuracy (%) over all tasks after the last one, and forgetting (percentage points; "
              "max earlier accuracy minus final, averaged over all but the last task), mean ± std over seeds. "
              "TIL: the true task is given; CIL: the model must also tell the task (" + (
                  "MIND, PackNet, experts: the task-inference rule `auto` chose on the seen tasks' validation data "
                  "after each task, named in 'rule', with the paper's max-probability rule beside it"
                  if all("rule_in_use" in r for r in runs if r["method"] in INFERRING) else
                  "runs saved before task inference existed: MIND/PackNet pick the most confident sub-network, "
                  "the max-probability rule") + "; single-head baselines: argmax over every class seen)."), ""]
    grouped = group(runs)
    for bench, per in grouped.items():
        seeds = sorted({r["seed"] for rs in per.values() for r in rs})
        lines += [f"## {TITLES[bench]}", "", f"Seeds: {', '.join(map(str, seeds))}.", "",
                  "| method | TIL acc | TIL forgetting | CIL acc | CIL forgetting | rule (last task) | "
                  "CIL by max_prob | s/run |", "|---|---|---|---|---|---|---|---|"]
        for m, rs in per.items():
            cells = [mean_std(final_values(rs, rule, key)) for rule in ("til", "cil")
                     for key in ("average_accuracy", "forgetting")]
            if "rule_in_use" in rs[0]:
                cells += [", ".join(sorted({r["rule_in_use"][-1] for r in rs})),
                          mean_std(final_values(rs, "cil_max_prob", "average_accuracy"))]
            else:
                cells += ["-", "-"]
            secs = np.mean([r["seconds"] for r in rs])
            name = f"{m} (upper bound)" if m in UPPER_BOUNDS else m
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs:.0f} |")
        lines.append("")
    if "permuted_mnist" in grouped:
        lines += [("Permuted MNIST here gives every task its own 10-class output block, so TIL is the digit "
                   "given the permutation and CIL is naming both the permutation and the digit: neither is the "
                   "domain-incremental protocol (one shared 10-class head) of the published Permuted MNIST "
                   "anchors."), ""]
    lines += ["## MIND vs the best baseline (Welch's t-test, two-sided)", "",
              "| benchmark | rule | MIND | best baseline | difference (pp) | t | p |", "|---|---|---|---|---|---|---|"]
    for bench, per in grouped.items():
        if "mind" not in per:
            continue
        for rule in ("cil", "til"):
            best = best_baseline(per, rule)
            if best is None:
                continue
            a = final_values(per["mind"], rule, "average_accuracy")
            b = final_values(per[best], rule, "average_accuracy")
            t, p = metrics.welch(a, b)
            lines.append(f"| {TITLES[bench]} | {rule.upper()} | {mean_std(a)} | {best}: {mean_std(b)} | "
                         f"{100 * (a.mean() - b.mean()):+.2f} | {t:.2f} | {p:.3g} |")
    lines += ["", "With few seeds the test has little power: read p as a rough guide, not a verdict.", ""]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Average accuracy after each task (mean over seeds), TIL above, CIL below, one column per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grouped = group(runs)
    fig, axes = plt.subplots(2, len(grouped), figsize=(4.6 * len(grouped), 7), squeeze=False)
    for col, (bench, per) in enumerate(grouped.items()):
        for row, rule in enumerate(("til", "cil")):
            ax = axes[row, col]
            for m, rs in per.items():
                c = np.mean([curve(np.asarray(r[rule])) for r in rs], axis=0)
                ax.plot(np.arange(1, len(c) + 1), 100 * c, marker="o", ms=3, label=m,
                        lw=2.2 if m in MIND_METHODS else 1.2, ls=":" if m in UPPER_BOUNDS else "-")
            ax.set_title(f"{TITLES[bench]}: {rule.upper()}", fontsize=10)
            ax.set_xlabel("after task")
            ax.set_ylabel("average accuracy (%)")
            ax.set_ylim(0, 101)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def hardware() -> str:
    """JAX backend, devices and host CPUs, for the report header."""
    import jax

    devs = jax.devices()
    return (f"Hardware: {', '.join(sorted({d.device_kind for d in devs}))} ({jax.default_backend()}, "
            f"{len(devs)} device(s)), host {platform.machine()} with {os.cpu_count()} CPU core(s); jax {jax.__version__}")


# ---------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"the CPU setting: {SETTINGS['quick'].describe()}")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1; default per setting)")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--data_root", default=None,
                   help="folder holding mnist/ and fashion_mnist/ archives (default $MODKD_DATA_DIR, else ../shared/data)")
    p.add_argument("--tfds_dir", default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--from_json", default=None,
                   help="re-render the report and plot from a saved accuracy*.json instead of training")
    return p


def write_report(out: Path, stem: str, runs: list[dict], setting: Setting, command: str, header: str) -> str:
    """Write ``stem``.md and ``stem``.png under ``out``; returns the Markdown."""
    report = markdown(runs, setting, command, header)
    (out / f"{stem}.md").write_text(report)
    plot(runs, out / f"{stem}.png", f"Average accuracy after each task ({setting.name} setting, mean over "
                                    f"{setting.seeds} seeds)")
    return report


def use_compilation_cache() -> None:
    """Persistent XLA cache (as the tests use): every seed and method rebuilds its jitted steps, same HLO."""
    import jax

    cache = os.environ.get("MODKD_JAX_CACHE", str(Path.home() / ".cache" / "modkd_jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    use_compilation_cache()
    setting = SETTINGS["quick" if args.quick else "full"]
    if args.seeds is not None:
        if args.seeds < 1:
            print(f"error: --seeds must be at least 1, got {args.seeds}", file=sys.stderr)
            return 2
        setting = dataclasses.replace(setting, seeds=args.seeds)
    from experiments.common import USER_ERRORS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "accuracy_quick" if args.quick else "accuracy"
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        stem = Path(args.from_json).stem
        print(write_report(out, stem, saved["runs"], Setting(**saved["setting"]), saved["command"],
                           saved["hardware"]))
        return 0
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    header = hardware()
    print(header, file=sys.stderr)
    runs, start = [], time.perf_counter()
    try:
        for bench in args.benchmarks:
            for seed in range(setting.seeds):
                for method in args.methods:
                    r = run_one(method, bench, seed, setting, args.data_root and Path(args.data_root), args.tfds_dir)
                    runs.append(r)
                    s = r["summary"]
                    print(f"{bench} seed {seed} {method}: TIL {100 * s['til']['average_accuracy']:.2f}  "
                          f"CIL {100 * s['cil']['average_accuracy']:.2f}  ({r['seconds']:.0f}s, "
                          f"{time.perf_counter() - start:.0f}s total)", file=sys.stderr, flush=True)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header += f"; total wall time {time.perf_counter() - start:.0f} s"
    (out / f"{stem}.json").write_text(json.dumps({"setting": dataclasses.asdict(setting), "command": command,
                                                  "hardware": header, "runs": runs}, indent=1) + "\n")
    print(write_report(out, stem, runs, setting, command, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
