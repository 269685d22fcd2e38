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

from experiments.common import (UsageError, add_config_flags, add_inference_flags, add_parallel_flags, add_run_flags,
                                config_from, config_of, guarded, inference_from, inference_given, mesh_from_args,
                                run_on_scenario, run_settings, show_progress)
from modkd_jax import models, training
from modkd_jax.methods import baselines

FLAGS = ("arch", "epochs", "retrain_epochs", "batch_size", "lr", "optimizer", "head", "lwf_alpha", "lwf_temperature",
         "ewc_lambda", "ewc_samples", "temperature", "crop_flip")
HELP = {"epochs": "training epochs per task", "retrain_epochs": "PackNet: retraining after pruning",
        "head": "single-head methods: CE over all classes seen so far, or over the task's block only",
        "lwf_alpha": "LwF: weight of the distillation term", "ewc_lambda": "EWC: weight of the Fisher penalty",
        "ewc_samples": "EWC: examples per task for the Fisher",
        "temperature": "PackNet: inference temperature (max-prob rule)"}
CHOICES = {"arch": models.ARCHS, "optimizer": training.OPTIMIZERS, "head": baselines.HEADS}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=baselines.METHODS)
    add_run_flags(p, default_dataset="cifar100")
    add_config_flags(p, baselines.BaselineConfig, FLAGS, HELP, CHOICES)
    add_inference_flags(p)
    add_parallel_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting (BaselineConfig defaults < MIND's dataset preset < flags), as in config.json."""
    preset = baselines.preset(args.dataset)
    cfg = {**run_settings(args, preset), "method": args.method}
    extra = {"crop_flip": False} if args.no_augment else {}
    if args.method != "packnet" and inference_given(args):
        raise UsageError(f"task inference picks a sub-network; {args.method} has one head (use --method packnet)")
    extra["inference"] = inference_from(args, baselines.BaselineConfig().inference)
    cfg["baseline"] = dataclasses.asdict(config_from(baselines.BaselineConfig, preset, args, FLAGS,
                                                     method=args.method, **extra))
    return cfg


def config_of_run(cfg: dict) -> baselines.BaselineConfig:
    """The BaselineConfig stored in a run's config dict."""
    return config_of(baselines.BaselineConfig, cfg["baseline"])


def run(cfg: dict, workdir, *, data_dir=None, tfds_dir=None, progress: bool = False, stop_after: int | None = None,
        echo=print, mesh=None) -> dict:
    """Run (or resume) the configured baseline (data-parallel over ``mesh`` if given); returns results.json's dict."""
    return run_on_scenario(lambda scenario: baselines.learner(config_of_run(cfg), scenario, mesh), cfg, workdir,
                           title=cfg["method"], data_dir=data_dir, tfds_dir=tfds_dir, progress=progress,
                           stop_after=stop_after, echo=echo)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    mesh = mesh_from_args(args)  # first: a multi-host start must precede any other JAX call
    cfg = resolve_config(args)
    workdir = args.workdir or (f"runs/{cfg['method']}_{cfg['dataset']}_{cfg['scenario']}_{cfg['task_count']}"
                               f"_s{cfg['seed']}")
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress(), mesh=mesh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
