"""Collective distillation: ``python -m experiments.collective --dataset mnist --agents 3``.

The classes are cut into ``--task_count`` tasks dealt round-robin to
``--agents`` agents; each learns its tasks with MIND, and the agents exchange
only the top ``--top_k`` joint scores of every image of an unlabelled probe
set (``modkd_jax.methods.collective``). One run holds every baseline: each
agent alone (its own learner), the same exchange with the learners' weights,
and a central model trained on every agent's data (upper bound).

The workdir is the run (``modkd_jax.loop``): config.json, metrics.jsonl,
results.json (accuracy per round's classes for every agent and rule, and the
``collective`` block: own / other / all-class accuracy and bytes sent per agent),
collective.md (the table), collective.png (all-class accuracy over rounds) and
one orbax checkpoint per round. Re-running the same command resumes.
``python -m experiments.dkt --experiment collective ...`` runs this command.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from experiments.common import (UsageError, add_agent_flags, add_config_flags, add_data_flags, config_from, config_of,
                                guarded, preset_for, show_progress)
from modkd_jax import data, loop, rundir
from modkd_jax.agents import TOPOLOGIES, default_devices
from modkd_jax.methods import collective, mind

NAMES = tuple(f.name for f in dataclasses.fields(collective.CollectiveConfig))
HELPS = {"agents": "agents (2-10)", "task_count": "tasks the classes are cut into, dealt round-robin",
         "topology": " or ".join(TOPOLOGIES), "hops": "exchange hops per round (0: agents - 1)",
         "lam": "weight of the probe distillation (0: every agent alone)",
         "n_probe": "unlabelled probe images held out of every agent's training data",
         "top_k": "table entries sent per probe image (class id uint8 + score float16)",
         "student_hidden": "the student MLP's hidden widths", "student_epochs": "student epochs per round",
         "joint_epochs": "epochs of the central model"}
VARIANT_ROWS = (("alone", "alone"), ("logits exchange", "agents"), ("weights exchange", "weights_exchange"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.collective", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=("collective",), default="collective",
                   help="collective only (what python -m experiments.dkt --experiment collective passes on)")
    add_data_flags(p, default_dataset="mnist")
    add_config_flags(p, collective.CollectiveConfig, NAMES, helps=HELPS, choices={"topology": TOPOLOGIES})
    p.add_argument("--mind_epochs", type=int, default=None,
                   help="MIND's teacher and distillation epochs per task (default: its dataset preset)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="validation share of each task (MIND's choices)")
    add_agent_flags(p)
    p.add_argument("--workdir", default=None, help="run directory (default runs/collective_<dataset>_a<N>_s<seed>)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting, as saved in config.json."""
    preset_for(mind.PRESETS, args.dataset, "experiments.collective")  # its agents are MIND learners
    cfg = config_from(collective.CollectiveConfig, {}, args, NAMES)
    overrides = {} if args.mind_epochs is None else {"epochs": args.mind_epochs, "distill_epochs": args.mind_epochs}
    if args.mind_epochs is not None and args.mind_epochs < 1:
        raise UsageError("--mind_epochs must be at least 1")
    try:
        mind_cfg = mind.preset_config(args.dataset, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in (0, 1): MIND chooses tau on it, got {args.val_fraction}")
    return dict(experiment="collective", dataset=args.dataset, seed=args.seed, val_fraction=args.val_fraction,
                agent_devices=args.agent_devices or default_devices(cfg.agents), collective=dataclasses.asdict(cfg),
                mind=dataclasses.asdict(mind_cfg))


def build_world(cfg: dict, data_dir=None, tfds_dir=None) -> collective.World:
    """Load the dataset and set the run up; bad settings become a UsageError."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        return collective.setup(config_of(collective.CollectiveConfig, cfg["collective"]), ds,
                                config_of(mind.MindConfig, cfg["mind"]), seed=cfg["seed"],
                                val_fraction=cfg["val_fraction"], agent_devices=cfg["agent_devices"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def table(results: dict) -> str:
    """Markdown: per agent and mean, own / other / all-class accuracy alone, with logits, with weights; bytes."""
    c = results["collective"]
    cfg = results["config"]
    A = len(c["agents"])
    head = (f"{cfg['dataset']}, {A} agents, {cfg['collective']['task_count']} tasks, seed {cfg['seed']}, "
            f"{c['hops']} hops, {c['n_probe']} probe images, top {c['top_k']}; central model all classes "
            f"{_pct(c['joint']['all_classes'])} %")
    cols = [f"{name} {part}" for name, _ in VARIANT_ROWS for part in ("own", "other", "all")]
    lines = [head, "", "| agent | " + " | ".join(cols) + " | bytes logits | bytes weights | ratio |",
             "|---|" + "---|" * (len(cols) + 3)]
    rows = [(str(a), {key: c[key][a] for _, key in VARIANT_ROWS}) for a in range(A)]
    mean = {key: {k: float(np.mean([r[k] for r in c[key]])) for k in ("own_classes", "other_classes",
                                                                        "all_classes", "bytes_sent")}
            for _, key in VARIANT_ROWS}
    for name, per in rows + [("mean", mean)]:
        cells = [_pct(per[key][part]) for _, key in VARIANT_ROWS for part in ("own_classes", "other_classes",
                                                                             "all_classes")]
        b, w = per["agents"]["bytes_sent"], per["weights_exchange"]["bytes_sent"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {b:,.0f} | {w:,.0f} | {100 * b / max(w, 1):.2f} % |")
    least = np.mean(c["weights_exchange_bytes"])
    lines += ["", f"Sending only one's own parameters (float32) every hop would send {least:,.0f} B per agent: "
                  f"logits are {100 * mean['agents']['bytes_sent'] / least:.2f} % of that."]
    return "\n".join(lines)


def all_class_curves(results: dict) -> dict[str, np.ndarray]:
    """All-class accuracy after every round, ``{rule: [A, rounds]}`` (rows weighted by each round's test images)."""
    weights = np.asarray(results["collective"]["round_test_images"], float)
    out = {}
    for rule in ("alone", "collective", "weights"):
        R = np.asarray(results["accuracy_matrix"][rule], float)  # [A, rounds, rounds]
        out[rule] = (R * weights).sum(-1) / weights.sum()
    return out


def plot(results: dict, path: Path) -> None:
    """collective.png: every agent's all-class accuracy after each round, per variant, and the central model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = all_class_curves(results)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    rounds = np.arange(1, next(iter(curves.values())).shape[1] + 1)
    labels = {"alone": "alone", "collective": "logits exchange", "weights": "weights exchange"}
    for (rule, R), color in zip(curves.items(), ("tab:gray", "tab:blue", "tab:orange")):
        for a, row in enumerate(R):
            ax.plot(rounds, 100 * row, "o-", color=color, alpha=0.8, label=labels[rule] if a == 0 else None)
    ax.axhline(100 * results["collective"]["joint"]["all_classes"], color="k", ls="--", label="central model")
    ax.set_xlabel("round (one task per agent)")
    ax.set_ylabel("all-class test accuracy (%)")
    ax.set_xticks(rounds)
    ax.set_title(f"{results['config']['dataset']}: {len(curves['alone'])} agents, seed {results['config']['seed']}")
    ax.legend(fontsize=8)
    rundir.save_figure(fig, path)


def run(cfg: dict, workdir: str | Path | None, *, data_dir=None, tfds_dir=None, progress: bool = False,
        stop_after: int | None = None, echo=print) -> dict:
    """Run (or resume) a collective run through ``loop.run``; writes collective.md / .png when it is finished."""
    echo = echo or (lambda _: None)
    world = build_world(cfg, data_dir, tfds_dir)
    results = loop.run(collective.learner(world), cfg, workdir, progress=progress, stop_after=stop_after, echo=echo,
                       title="collective distillation")
    if results["tasks_done"] == world.rounds:
        text = table(results)
        echo(text)
        if workdir is not None:
            (Path(workdir) / "collective.md").write_text(text + "\n")
            plot(results, Path(workdir) / "collective.png")
    return results


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    workdir = args.workdir or f"runs/collective_{cfg['dataset']}_a{cfg['collective']['agents']}_s{cfg['seed']}"
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
