"""Baselines under MIND's protocol: ``python -m experiments.baselines --method {finetune,joint,packnet,lwf,ewc}``.

Same datasets, scenarios, per-dataset defaults (network, epochs, batch size,
learning rate, augmentation) and run directory as ``experiments.mind``:
config.json, metrics.jsonl, results.json (TIL / CIL accuracy matrices),
accuracy heatmaps and one orbax checkpoint per finished task; re-running the
same command resumes. ``--epochs`` is the training of each task (MIND's teacher
epochs); PackNet retrains its kept share for ``--retrain_epochs`` (default:
MIND's distillation epochs).
"""

from __future__ import annotations

import argparse
import dataclasses

from experiments import runner
from experiments.common import UsageError, add_data_flags, guarded, show_progress
from experiments.mind import DEFAULTS, build_scenario
from modkd_jax import models
from modkd_jax.methods import baselines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=baselines.METHODS)
    add_data_flags(p, default_dataset="cifar100")
    p.add_argument("--scenario", default="class_split", choices=("class_split", "permuted"))
    p.add_argument("--task_count", type=int, default=None, help="number of tasks (default per dataset)")
    p.add_argument("--arch", default=None, choices=models.ARCHS)
    p.add_argument("--epochs", type=int, default=None, help="training epochs per task")
    p.add_argument("--retrain_epochs", type=int, default=None, help="PackNet: retraining after pruning")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--head", default="seen", choices=baselines.HEADS,
                   help="single-head methods: CE over all classes seen so far, or over the task's block only")
    p.add_argument("--lwf_alpha", type=float, default=1.0, help="LwF: weight of the distillation term")
    p.add_argument("--lwf_temperature", type=float, default=2.0)
    p.add_argument("--ewc_lambda", type=float, default=1000.0, help="EWC: weight of the Fisher penalty")
    p.add_argument("--ewc_samples", type=int, default=1024, help="EWC: examples per task for the Fisher")
    p.add_argument("--temperature", type=float, default=6.5, help="PackNet: inference temperature (max-prob rule)")
    p.add_argument("--no_augment", action="store_true", help="disable crop+flip on CIFAR")
    p.add_argument("--val_fraction", type=float, default=0.1, help="held out from train for monitoring")
    p.add_argument("--workdir", default=None, help="run directory (default runs/<method>_<dataset>_...)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting of the run (flags over experiments.mind's per-dataset defaults)."""
    d = DEFAULTS[args.dataset]
    pick = lambda name, default=None: getattr(args, name) if getattr(args, name) is not None else d[default or name]  # noqa: E731
    cfg = dict(dataset=args.dataset, scenario=args.scenario, seed=args.seed, val_fraction=args.val_fraction,
               task_count=pick("task_count"), method=args.method)
    try:
        b = baselines.BaselineConfig(
            method=args.method, arch=pick("arch"), hidden=tuple(d.get("hidden", (400, 400))), epochs=pick("epochs"),
            retrain_epochs=pick("retrain_epochs", "distill_epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
            optimizer=args.optimizer, head=args.head, lwf_alpha=args.lwf_alpha,
            lwf_temperature=args.lwf_temperature, ewc_lambda=args.ewc_lambda, ewc_samples=args.ewc_samples,
            temperature=args.temperature, crop_flip=d["crop_flip"] and not args.no_augment)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    cfg["baseline"] = dataclasses.asdict(b)
    return cfg


def config_of(cfg: dict) -> baselines.BaselineConfig:
    """The BaselineConfig stored in a run's config dict."""
    return baselines.BaselineConfig(**{**cfg["baseline"], "hidden": tuple(cfg["baseline"]["hidden"])})


def run(cfg: dict, workdir, *, data_dir=None, tfds_dir=None, progress: bool = False, stop_after: int | None = None,
        echo=print) -> dict:
    """Run (or resume) the configured baseline; returns the results dict written to results.json."""
    scenario = build_scenario(cfg, data_dir, tfds_dir)
    try:
        learner = runner.baseline_learner(config_of(cfg), scenario)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return runner.run(learner, scenario, cfg, workdir, progress=progress, stop_after=stop_after, echo=echo,
                      title=f"{cfg['method']} on {scenario.name}")


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.task_count is not None and args.task_count < 1:
        raise UsageError(f"--task_count must be at least 1, got {args.task_count}")
    cfg = resolve_config(args)
    workdir = args.workdir or (f"runs/{cfg['method']}_{cfg['dataset']}_{cfg['scenario']}_{cfg['task_count']}"
                               f"_s{cfg['seed']}")
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
