"""MIND end to end: ``python -m experiments.mind --task_count 10`` (CIFAR-100, the paper's protocol).

The workdir is the run: config.json, metrics.jsonl, results.json, accuracy
heatmaps and one orbax checkpoint per finished task. Re-running the same
command resumes after the last finished task.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from experiments import runner
from experiments.common import UsageError, add_data_flags, add_parallel_flags, guarded, mesh_from_args, show_progress
from modkd_jax import data, losses, models
from modkd_jax.methods import mind

# Per-dataset defaults. CIFAR-100 is the paper's protocol: the whole training split (no validation),
# crop + flip + brightness jitter 63/255 and the reference's tau 6.5. Datasets without a reference tau
# ("auto") choose it on the seen tasks' validation split after every task; the small sets use an MLP.
REFERENCE_BRIGHTNESS = 63 / 255
DEFAULTS = {
    "cifar100": dict(arch="resnet32", task_count=10, epochs=50, distill_epochs=50, batch_size=256, lr=0.005,
                     distill_lr=0.035, crop_flip=True, brightness=REFERENCE_BRIGHTNESS, temperature=6.5,
                     val_fraction=0.0),
    "cifar10": dict(arch="resnet32", task_count=5, epochs=50, distill_epochs=50, batch_size=256, lr=0.005,
                    distill_lr=0.035, crop_flip=True, brightness=REFERENCE_BRIGHTNESS, temperature="auto",
                    val_fraction=0.1),
    "mnist": dict(arch="mlp", task_count=5, epochs=5, distill_epochs=5, batch_size=128, lr=0.001,
                  distill_lr=0.005, crop_flip=False, brightness=0.0, temperature="auto", val_fraction=0.1),
    "fashion_mnist": dict(arch="mlp", task_count=5, epochs=5, distill_epochs=5, batch_size=128, lr=0.001,
                          distill_lr=0.005, crop_flip=False, brightness=0.0, temperature="auto", val_fraction=0.1),
    "digits": dict(arch="mlp", task_count=5, epochs=30, distill_epochs=30, batch_size=64, lr=0.001,
                   distill_lr=0.005, crop_flip=False, brightness=0.0, temperature="auto", val_fraction=0.1,
                   hidden=(128, 128)),
}


def inference_temperature(setting: float | str) -> float | None:
    """A ``--temperature`` setting as ``MindConfig.temperature``: a number, or None for ``auto``."""
    return None if setting == "auto" else setting


def _temperature(text: str):
    """``--temperature``: a positive number, or ``auto`` (chosen on validation data)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got {text!r}")
    return value


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
    p.add_argument("--beta", type=float, default=5.0, help="weight of the distillation term")
    p.add_argument("--distill_loss", default="symkl", choices=losses.DISTILL_LOSSES,
                   help="symkl: the paper's L_SD = 1/2 [KL(t||s) + KL(s||t)]; js: true Jensen-Shannon; kd: Hinton")
    p.add_argument("--distill_temperature", type=float, default=1.0,
                   help="temperature T of the distillation term (scaled by T^2); the paper: 1")
    p.add_argument("--temperature", type=_temperature, default=None,
                   help="inference temperature tau, or 'auto': chosen on the seen tasks' validation split "
                        "(default: the reference's value, CIFAR-100 6.5; auto where it has none)")
    p.add_argument("--policy", default="random", choices=("random", "magnitude"))
    p.add_argument("--self_distillation", action="store_true")
    p.add_argument("--init_new", default="zero", choices=("zero", "keep"),
                   help="start newly assigned weights at zero (reference) or keep their random init")
    p.add_argument("--teacher_bn", default="running", choices=("running", "batch"),
                   help="teacher's batch norm while distilling: running statistics, or batch statistics")
    p.add_argument("--bn_init", default="fresh", choices=("fresh", "copy"),
                   help="a task's batch-norm row starts fresh, or as a copy of the previous task's (reference)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="decoupled weight decay (AdamW) of both phases")
    p.add_argument("--no_augment", action="store_true", help="disable crop, flip and brightness jitter on CIFAR")
    p.add_argument("--drop_last", action="store_true", help="skip each epoch's last partial batch")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="held out of each task's training split (default: CIFAR-100 0, the reference's "
                        "protocol; 0.1 elsewhere)")
    p.add_argument("--workdir", default=None, help="run directory (default runs/mind_<dataset>_...)")
    add_parallel_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting of the run (flags over per-dataset defaults), as saved in config.json."""
    d = DEFAULTS[args.dataset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    cfg = dict(dataset=args.dataset, scenario=args.scenario, seed=args.seed, val_fraction=pick("val_fraction"),
               task_count=pick("task_count"))
    try:
        mind_cfg = mind.MindConfig(
            arch=pick("arch"), hidden=tuple(d.get("hidden", (400, 400))), epochs=pick("epochs"),
            distill_epochs=pick("distill_epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
            distill_lr=pick("distill_lr"), optimizer=args.optimizer, beta=args.beta, distill_loss=args.distill_loss,
            distill_temperature=args.distill_temperature, temperature=inference_temperature(pick("temperature")),
            policy=args.policy, self_distillation=args.self_distillation, init_new=args.init_new,
            crop_flip=d["crop_flip"] and not args.no_augment, brightness=0.0 if args.no_augment else d["brightness"],
            drop_last=args.drop_last, teacher_bn=args.teacher_bn, bn_init=args.bn_init,
            weight_decay=args.weight_decay)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.self_distillation and args.policy != "magnitude":
        mind_cfg = dataclasses.replace(mind_cfg, policy="magnitude")  # self-distillation keeps the largest |w|
    cfg["mind"] = dataclasses.asdict(mind_cfg)
    if mind_cfg.temperature is None:
        cfg["mind"]["temperature"] = "auto"  # config.json says it in words; results.json has the chosen values
    return cfg


def mind_config(cfg: dict) -> mind.MindConfig:
    """The MindConfig stored in a run's config dict (JSON lists back to tuples, "auto" to None)."""
    m = cfg["mind"]
    return mind.MindConfig(**{**m, "temperature": inference_temperature(m["temperature"]),
                              "hidden": tuple(m["hidden"]), "tau_grid": tuple(m["tau_grid"])})


def build_scenario(cfg: dict, data_dir=None, tfds_dir=None) -> data.Scenario:
    """Load the dataset and cut it into tasks; bad task counts become a UsageError."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        return data.build(cfg["scenario"], ds, cfg["task_count"], seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False,
        stop_after: int | None = None, echo=print, mesh=None) -> dict:
    """Run (or resume) MIND as configured; returns the results dict written to results.json.

    ``stop_after`` ends the run after that many finished tasks (to test resuming); ``mesh``
    (``parallel.make_mesh``) runs the same steps data-parallel.
    """
    scenario = build_scenario(cfg, data_dir, tfds_dir)
    try:
        learner = runner.mind_learner(mind_config(cfg), scenario, mesh=mesh)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return runner.run(learner, scenario, cfg, workdir, progress=progress, stop_after=stop_after, echo=echo,
                      title=f"MIND on {scenario.name}")


final_table = runner.final_table  # the end-of-run table, shared with the baselines


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.task_count is not None and args.task_count < 1:
        raise UsageError(f"--task_count must be at least 1, got {args.task_count}")
    mesh = mesh_from_args(args)  # first: a multi-host start must precede any other JAX call
    cfg = resolve_config(args)
    workdir = args.workdir or f"runs/mind_{cfg['dataset']}_{cfg['scenario']}_{cfg['task_count']}_s{cfg['seed']}"
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress(), mesh=mesh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
