"""Collective distillation over seeds: docs/collective.md's table (mean ± std) and plot, from the CLI's run directories.

    python -m benchmarks.collective                     # Split MNIST and Fashion-MNIST, 3 agents, seeds 0-2
    python -m benchmarks.collective --datasets mnist --seeds 1

Each (dataset, seed) is ``python -m experiments.dkt --experiment collective
--dataset D --agents 3 --seed S`` with its defaults in ``<root>/<D>_s<S>``: a
finished run directory is only read, an unfinished one resumes. Per variant
(alone, logits exchange, weights exchange) the table gives the agents' mean
own / other / all-class test accuracy (mean ± std over seeds of the mean over
agents), the worst agent's all-class accuracy against the central model and its
own-class drop against training alone (the issue's goals), and bytes sent per
agent against what sending one's parameters every hop would send. The central
model's row gives its accuracy on each agent's own classes (predicting among all
classes) and its worst drop against the agent alone: what any all-class
predictor as good as the upper bound gives up on an agent's own classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

VARIANTS = (("alone", "alone"), ("logits exchange", "agents"), ("weights exchange", "weights_exchange"))
PARTS = ("own_classes", "other_classes", "all_classes")


def run_dir(root: Path, dataset: str, seed: int, data_root: Path, agents: int) -> Path:
    """Run (or resume, or only read) one CLI run; returns its directory."""
    from experiments import dkt as cli

    workdir = root / f"{dataset}_s{seed}"
    args = ["--experiment", "collective", "--dataset", dataset, "--data_dir", str(data_root / dataset),
            "--agents", str(agents), "--seed", str(seed), "--workdir", str(workdir)]
    if cli.main(args) != 0:
        raise SystemExit(f"experiments.dkt {' '.join(args)} failed")
    return workdir


def _ms(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def summarize(blocks: list[dict]) -> dict:
    """Per seed: each variant's mean over agents, the worst agent's ratio to joint and own-class drop, bytes."""
    out = {"joint": [b["joint"]["all_classes"] for b in blocks],
           "joint.own_classes": [np.mean(b["joint"]["own_classes"]) for b in blocks],
           "joint.worst_drop": [max(al["own_classes"] - j for j, al in zip(b["joint"]["own_classes"], b["alone"]))
                                for b in blocks]}
    for _, key in VARIANTS:
        for part in PARTS:
            out[f"{key}.{part}"] = [np.mean([a[part] for a in b[key]]) for b in blocks]
        out[f"{key}.worst_ratio"] = [min(a["all_classes"] for a in b[key]) / b["joint"]["all_classes"]
                                     for b in blocks]
        out[f"{key}.worst_drop"] = [max(al["own_classes"] - a["own_classes"] for a, al in zip(b[key], b["alone"]))
                                    for b in blocks]
        out[f"{key}.bytes"] = [np.mean([a["bytes_sent"] for a in b[key]]) for b in blocks]
    out["param_bytes"] = [np.mean(b["weights_exchange_bytes"]) for b in blocks]
    return out


def table(name: str, s: dict, seeds: int) -> str:
    """Markdown rows for one dataset."""
    lines = [f"**{name}** ({seeds} seed(s); central model, all classes: {_ms(s['joint'])} %)", "",
             "| variant | own classes | other classes | all classes | worst agent all / central | worst own-class "
             "drop (points) | bytes sent per agent | / parameters every hop |",
             "|---|---|---|---|---|---|---|---|"]
    for label, key in VARIANTS:
        b = np.mean(s[f"{key}.bytes"])
        ratio = "-" if key == "alone" else f"{100 * b / np.mean(s['param_bytes']):.2f} %"
        drop = "-" if key == "alone" else f"{100 * max(s[f'{key}.worst_drop']):.2f}"
        lines.append(f"| {label} | {_ms(s[f'{key}.own_classes'])} | {_ms(s[f'{key}.other_classes'])} | "
                     f"{_ms(s[f'{key}.all_classes'])} | {100 * min(s[f'{key}.worst_ratio']):.1f} % | {drop} | "
                     f"{b:,.0f} | {ratio} |")
    lines.append(f"| central model (all data) | {_ms(s['joint.own_classes'])} | - | {_ms(s['joint'])} | 100 % | "
                 f"{100 * max(s['joint.worst_drop']):.2f} | - | - |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """All-class accuracy after each round (mean over agents and seeds) per variant, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.collective import all_class_curves
    from modkd_jax import rundir

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    labels = {"alone": "alone", "collective": "logits exchange", "weights": "weights exchange"}
    for ax, (name, results) in zip(axes[0], runs.items()):
        curves = [all_class_curves(r) for r in results]
        for rule, color in zip(labels, ("tab:gray", "tab:blue", "tab:orange")):
            per_seed = np.stack([c[rule].mean(0) for c in curves])  # [seeds, rounds]
            x = np.arange(1, per_seed.shape[1] + 1)
            ax.errorbar(x, 100 * per_seed.mean(0), yerr=100 * per_seed.std(0), fmt="o-", color=color,
                        label=labels[rule], capsize=3)
        ax.axhline(100 * np.mean([r["collective"]["joint"]["all_classes"] for r in results]), color="k", ls="--",
                   label="central model")
        ax.set_title(name)
        ax.set_xlabel("round (one task per agent, then the exchange)")
        ax.set_ylabel("all-class test accuracy (%), mean over agents")
        ax.set_xticks(x)
        ax.legend(fontsize=8)
    rundir.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.collective", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=("mnist", "fashion_mnist"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("runs/collective"), help="where the run directories live")
    p.add_argument("--data_root", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/collective.md"))
    args = p.parse_args(argv)
    titles = {"mnist": "Split MNIST", "fashion_mnist": "Split Fashion-MNIST"}
    parts, runs = [], {}
    for ds in args.datasets:
        results = [json.loads((run_dir(args.root, ds, s, args.data_root, args.agents) / "results.json").read_text())
                   for s in range(args.seeds)]
        runs[titles[ds]] = results
        parts.append(table(titles[ds], summarize([r["collective"] for r in results]), args.seeds))
    cfg = runs[titles[args.datasets[0]]][0]["config"]["collective"]
    parts.insert(0, f"{args.agents} agents, {cfg['task_count']} tasks dealt round-robin, {cfg['n_probe']} probe "
                    f"images, top {cfg['top_k']}, {cfg['topology']}; command: python -m benchmarks.collective "
                    f"--seeds {args.seeds}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(parts) + "\n")
    plot(runs, args.out.with_suffix(".png"))
    print("\n\n".join(parts))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
