"""DKT end to end: ``python -m experiments.dkt --experiment agents --dataset mnist --agents 3``.

``--experiment collective`` hands the command line to ``python -m
experiments.collective`` (agents with non-forgetting learners distilling each
other on a probe set; its own flags).
Experiments: ``joint_teacher`` (a teacher trained on every class teaches a
class-incremental student), ``continual_teacher`` (the teacher is a fine-tuning
continual learner one experience ahead, refreshed each experience) and
``agents`` (N agents, each with its own class order of the same dataset,
taking a neighbour as teacher every ``--exchange_every`` epochs over a ring or
random gossip). ``--exchange probe`` sends only logits on a held-out probe set;
``--exchange weights`` sends the model. ``--alone`` (or ``--lam 0``) is the
same run with no exchange. ``--compare`` runs alone, probe and weights side by
side in ``<workdir>/{alone,probe,weights}`` and prints the comparison table.

The workdir is the run (``modkd_jax.loop``): config.json, metrics.jsonl,
results.json (TIL/CIL matrices of both heads per agent, bytes sent), the
accuracy heatmaps and one orbax checkpoint per finished experience.
Re-running the same command resumes. Defaults: ``DKTConfig`` and its
per-dataset ``PRESETS`` (``modkd_jax.methods.dkt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from experiments import collective
from experiments.common import (UsageError, add_agent_flags, add_config_flags, add_data_flags, config_from, config_of,
                                guarded, preset_for, show_progress)
from modkd_jax import data, loop, rundir
from modkd_jax.agents import TOPOLOGIES, default_devices
from modkd_jax.methods import dkt
from modkd_jax.models import two_head

NAMES = tuple(f.name for f in dataclasses.fields(dkt.DKTConfig))
HELPS = {
    "experiment": f"one of {', '.join(dkt.EXPERIMENTS)} (collective: python -m experiments.collective)",
    "agents": "agents in the agents experiment (>= 2)",
    "exchange": f"what travels: {' or '.join(dkt.MODES)}", "topology": f"{' or '.join(TOPOLOGIES)}",
    "exchange_every": "epochs between exchange rounds", "alone": "no exchange: each learner trained alone",
    "lam": "weight of the distillation loss", "kd": f"{' or '.join(dkt.KD_LOSSES)}",
    "backbone": f"one of {', '.join(two_head.BACKBONES)}",
    "epochs": "epochs per experience", "n_probe": "probe images held out of the training pool",
    "probe_batch_size": "probe images per step (default: --batch_size)",
}


def parser() -> argparse.ArgumentParser:
    """The CLI's flags: data flags, one flag per ``DKTConfig`` field, the scenario and the run."""
    p = argparse.ArgumentParser(prog="python -m experiments.dkt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, default_dataset="mnist")
    add_config_flags(p, dkt.DKTConfig, NAMES, helps=HELPS)
    p.add_argument("--task_count", type=int, default=None, help="experiences (default per dataset)")
    p.add_argument("--val_fraction", type=float, default=None, help="validation share (default per dataset)")
    add_agent_flags(p)
    p.add_argument("--compare", action="store_true", help="agents: run alone, probe and weights and tabulate")
    p.add_argument("--workdir", default=None, help="run directory (default runs/dkt_<experiment>_<dataset>_...)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting (flags over the dataset's preset over ``DKTConfig``), as saved in config.json."""
    preset = preset_for(dkt.PRESETS, args.dataset, "experiments.dkt")
    cfg = config_from(dkt.DKTConfig, preset, args, NAMES)
    task_count = preset["task_count"] if args.task_count is None else args.task_count
    if task_count < 1:
        raise UsageError(f"--task_count must be at least 1, got {task_count}")
    return dict(dataset=args.dataset, seed=args.seed, task_count=task_count,
                val_fraction=preset["val_fraction"] if args.val_fraction is None else args.val_fraction,
                agent_devices=args.agent_devices or default_devices(cfg.agents), dkt=dataclasses.asdict(cfg))


def build_learner(cfg: dict, data_dir=None, tfds_dir=None):
    """Load the dataset and set the run up as a ``Learner``; bad settings become a UsageError."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        world = dkt.setup(config_of(dkt.DKTConfig, cfg["dkt"]), ds, cfg["task_count"], seed=cfg["seed"],
                          agent_devices=cfg["agent_devices"], val_fraction=cfg["val_fraction"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return dkt.learner(world)


def run(cfg: dict, workdir: str | Path | None, *, data_dir=None, tfds_dir=None, progress: bool = False,
        stop_after: int | None = None, echo=print) -> dict:
    """Run (or resume) DKT as configured through ``loop.run``; returns the results dict (also results.json)."""
    learner = build_learner(cfg, data_dir, tfds_dir)
    title = f"DKT {cfg['dkt']['experiment']} ({dkt.mode_name(config_of(dkt.DKTConfig, cfg['dkt']))})"
    return loop.run(learner, cfg, workdir, progress=progress, stop_after=stop_after, echo=echo, title=title)


def _pct(v) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def compare(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False,
            echo=print) -> dict:
    """Run the agents experiment alone, with probe exchange and with weights exchange; tabulate per agent."""
    workdir = Path(workdir)
    runs, wall = {}, {}
    for name in ("alone", "probe", "weights"):
        sub = {**cfg, "dkt": {**cfg["dkt"], "alone": name == "alone",
                              "exchange": "probe" if name == "alone" else name}}
        echo(f"--- {name}")
        t0 = time.perf_counter()
        runs[name] = run(sub, workdir / name, data_dir=data_dir, tfds_dir=tfds_dir, progress=progress, echo=echo)
        wall[name] = time.perf_counter() - t0
    table = comparison_table(runs, cfg)
    rundir.write_json(workdir / "comparison.json", {
        "config": cfg, "table": table, "wall_seconds": wall,
        "agents": {name: [{**{k: v[a] for k, v in r["final"].items()}, "bytes_sent": sent}
                          for a, sent in enumerate(r["exchange"]["bytes_sent_per_agent"])]
                   for name, r in runs.items()}})
    (workdir / "comparison.md").write_text(table + "\n")
    echo(table)
    return runs


def comparison_table(runs: dict, cfg: dict) -> str:
    """Markdown: each agent's final CL-head accuracy alone vs with each exchange, student head, bytes."""
    both, modes = ("probe", "weights"), ("alone", "probe", "weights")
    head = (f"{cfg['dataset']}, {cfg['task_count']} experiences, {cfg['dkt']['agents']} agents, "
            f"{cfg['dkt']['epochs']} epochs/experience, {cfg['dkt']['topology']}, lam {cfg['dkt']['lam']}")
    lines = [head, "",
             "| agent | CL CIL alone | CL CIL probe | CL CIL weights | CL TIL alone | CL TIL probe | CL TIL weights "
             "| student CIL probe | student CIL weights | MB sent probe | MB sent weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    final = lambda n, k: runs[n]["final"][k]  # noqa: E731  (one value per agent)
    sent = {n: runs[n]["exchange"]["bytes_sent_per_agent"] for n in both}
    for a in range(cfg["dkt"]["agents"]):
        lines.append(f"| {a} | " + " | ".join(_pct(final(n, "cl_cil")[a]) for n in modes) + " | "
                     + " | ".join(_pct(final(n, "cl_til")[a]) for n in modes) + " | "
                     + " | ".join(_pct(final(n, "student_cil")[a]) for n in both) + " | "
                     + " | ".join(f"{sent[n][a] / 1e6:.2f}" for n in both) + " |")
    mean = lambda n, k: float(np.mean(np.asarray(final(n, k), float)))  # noqa: E731
    lines.append("| mean | " + " | ".join(_pct(mean(n, "cl_cil")) for n in modes) + " | "
                 + " | ".join(_pct(mean(n, "cl_til")) for n in modes) + " | "
                 + " | ".join(_pct(mean(n, "student_cil")) for n in both) + " | "
                 + " | ".join(f"{sum(sent[n]) / 1e6:.2f} (all)" for n in both) + " |")
    return "\n".join(lines)


def experiment_of(argv: list[str] | None) -> str | None:
    """The ``--experiment`` of a command line (argparse reads it; every other flag is left to the command)."""
    dispatch = argparse.ArgumentParser(add_help=False)
    dispatch.add_argument("--experiment", default=None)
    return dispatch.parse_known_args(argv)[0].experiment


@guarded
def main(argv: list[str] | None = None) -> int:
    if experiment_of(argv) == "collective":  # its own command, flags and run directory
        return collective.main(argv)
    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    experiment = cfg["dkt"]["experiment"]
    if args.compare and experiment != "agents":
        raise UsageError("--compare is for --experiment agents")
    tag = "compare" if args.compare else dkt.mode_name(config_of(dkt.DKTConfig, cfg["dkt"]))
    workdir = args.workdir or (f"runs/dkt_{experiment}_{cfg['dataset']}_{tag}_a{cfg['dkt']['agents']}"
                               f"_s{cfg['seed']}")
    if args.compare:
        compare(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    else:
        run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
