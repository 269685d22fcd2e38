"""What every experiment CLI shares: data flags, clean failure on bad input, progress settings."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Callable, Iterable

from modkd_jax.checkpoint import CheckpointError
from modkd_jax import data, gaussians, task_inference
from modkd_jax.methods import from_preset
from modkd_jax.data import DATASETS, DataUnavailableError
from modkd_jax.rundir import RunDirError

# Errors that mean "bad input", reported as one line and exit code 2.
USER_ERRORS = (DataUnavailableError, RunDirError, CheckpointError)


class UsageError(ValueError):
    """A flag combination that cannot run; reported as one line, exit code 2."""


def add_data_flags(parser: argparse.ArgumentParser, default_dataset: str) -> None:
    """--dataset, --data_dir, --tfds_dir, --seed (a CLI refuses a dataset its method has no preset for, in one line:
    ``preset_for``)."""
    parser.add_argument("--dataset", default=default_dataset, choices=DATASETS)
    parser.add_argument("--data_dir", default=None,
                        help="folder with the official archives (TFDS manual_dir), e.g. ../shared/data/mnist; "
                             "env MODKD_DATA_DIR")
    parser.add_argument("--tfds_dir", default=None, help="where TFDS keeps prepared data (env MODKD_TFDS_DIR)")
    parser.add_argument("--seed", type=int, default=0)


def preset_for(presets: dict, dataset: str, cli: str) -> dict:
    """``presets[dataset]``, or a UsageError naming the datasets ``cli`` (``"experiments.dkt"`` ...) supports."""
    if dataset not in presets:
        raise UsageError(f"{cli} supports {', '.join(presets)}, not {dataset}")
    return presets[dataset]


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    """--agent_devices: the devices the agents axis is sharded over (DKT, collective)."""
    parser.add_argument("--agent_devices", type=int, default=0,
                        help="devices the agents axis is sharded over (0: all devices when they divide --agents)")


def show_progress() -> bool:
    """Progress bars on an interactive terminal, quiet in CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main``; bad input ends with one line on stderr and exit code 2, not a traceback.

    In a multi-process run, a computation that fails because another process
    died ends this one at once with one line on stderr and exit code 3
    (``parallel.peer_failure``, ``parallel.abandon``).
    """

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS + (UsageError,) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; re-run the same command to resume after the last finished task", file=sys.stderr)
            return 130
        except Exception as exc:
            from modkd_jax import parallel

            line = parallel.peer_failure(exc)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            parallel.abandon(3)

    return wrapper


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """--devices (data-parallel width), --distributed and the multi-process start-up settings."""
    parser.add_argument("--devices", type=int, default=0,
                        help="devices on the 'data' mesh axis (0: all visible; 1: no mesh)")
    parser.add_argument("--distributed", action="store_true",
                        help="start JAX's multi-process runtime first (run the same command on every host; on "
                             "Cloud TPU and SLURM it finds its peers itself)")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 (implies --distributed; env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="number of processes (implies --distributed; env JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=None,
                        help="this process's id, 0..num_processes-1 (implies --distributed; env JAX_PROCESS_ID)")
    parser.add_argument("--heartbeat_timeout", type=int, default=None,
                        help="seconds without a heartbeat before JAX declares a process dead and ends the others "
                             "(default: jax's 100); a dead peer met in a collective ends this process at once")


def mesh_from_args(args: argparse.Namespace):
    """The data-parallel mesh the flags ask for, or None for a single device (the plain jitted steps)."""
    from modkd_jax import parallel

    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    heartbeat = getattr(args, "heartbeat_timeout", None)
    if heartbeat is not None and heartbeat < 1:
        raise UsageError(f"--heartbeat_timeout must be at least 1 second, got {heartbeat}")
    timeouts = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}
    try:
        parallel.maybe_initialize_distributed(args.distributed or any(v is not None for v in explicit),
                                              *explicit, **timeouts)
    except (ValueError, RuntimeError) as exc:  # jax reports bad or missing settings as either
        raise UsageError(f"multi-process start failed: {' '.join(str(exc).split())}") from exc
    import jax

    n = jax.device_count() if args.devices == 0 else args.devices
    if n < 1 or n > jax.device_count():
        raise UsageError(f"--devices {args.devices}: {jax.device_count()} device(s) visible")
    return None if n == 1 else parallel.make_mesh(data=n)


def _flag_type(hint) -> tuple[Callable | None, str | None]:
    """``(type, nargs)`` of a flag for a dataclass field's type hint; bools are on/off switches."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], "+"
    if args:  # X | None
        return _flag_type(args[0])
    return hint, None


def add_config_flags(parser: argparse.ArgumentParser, cls, names: Iterable[str], helps: dict[str, str] | None = None,
                     choices: dict[str, Iterable] | None = None, types: dict[str, Callable] | None = None) -> None:
    """One ``--name`` flag per field ``name`` of the config dataclass ``cls``, default None (= not given).

    Defaults live in one place: the dataclass (and the method's per-dataset presets beside it);
    ``config_from`` lays the given flags over them. Bool fields get ``--name`` / ``--no-name``.
    """
    hints = typing.get_type_hints(cls)
    helps, choices, types = helps or {}, choices or {}, types or {}
    for name in names:
        kind, nargs = _flag_type(hints[name])
        kwargs: dict = {"default": None, "help": helps.get(name)}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=types.get(name, kind), nargs=nargs)
            if name in choices:
                kwargs["choices"] = tuple(choices[name])
        parser.add_argument(f"--{name}", **kwargs)


def given(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """The flags among ``names`` that were given on the command line (tuples for nargs flags)."""
    out = {}
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


def config_from(cls, preset: dict, args: argparse.Namespace, names: Iterable[str], **overrides):
    """``cls`` built from its defaults, then ``preset`` (its fields only), the given flags, ``overrides``.

    A rejected value (the dataclass's ``__post_init__``) is a UsageError: one line, exit 2.
    """
    try:
        return from_preset(cls, preset, **{**given(args, names), **overrides})
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def config_of(cls, stored: dict):
    """A config dataclass back from config.json (JSON lists to tuples, nested configs rebuilt)."""
    hints = typing.get_type_hints(cls)

    def value(name, v):
        if isinstance(v, dict) and dataclasses.is_dataclass(hints.get(name)):
            return config_of(hints[name], v)
        return tuple(v) if isinstance(v, list) else v

    return cls(**{k: value(k, v) for k, v in stored.items()})


INFERENCE_FLAGS = tuple(f.name for f in dataclasses.fields(task_inference.InferenceConfig))
INFERENCE_HELP = {
    "task_inference": "how a class-incremental prediction picks the sub-network / expert: a rule, or 'auto' "
                      "(the best task identification on the seen tasks' validation split after every task)",
    "gauss_shrinkage": "Gaussian rules: covariance shrunk this far toward its scaled identity",
    "gauss_rank": "Gaussian rules: eigenvectors kept per covariance (0: the full covariance)",
    "gauss_components": "Gaussian rules: Gaussians per class (k-means clusters; 0: 40 per task among its classes)",
    "gauss_covariance": "Gaussian rules: one covariance per Gaussian ('component') or one per task",
    "prototypes": "prototype rule: spherical k-means centroids per task",
    "choice_examples": "auto: validation examples per seen task the rules are scored on (0: every one)",
    "report_rules": "test accuracies of 'used' rules only (max_prob and the rule in use) or of 'all' rules "
                    "(their statistics are then fitted too)",
}


def add_inference_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """--task_inference RULE|auto and the statistics' settings (``task_inference.InferenceConfig``) but ``skip``."""
    add_config_flags(parser, task_inference.InferenceConfig, [f for f in INFERENCE_FLAGS if f not in skip],
                     INFERENCE_HELP,
                     {"task_inference": ("auto",) + task_inference.RULES,
                      "gauss_covariance": gaussians.COVARIANCES, "report_rules": task_inference.REPORTS})


def inference_given(args: argparse.Namespace) -> bool:
    """Whether any task-inference flag was given."""
    return bool(given(args, INFERENCE_FLAGS))


def inference_from(args: argparse.Namespace, base: task_inference.InferenceConfig,
                   skip: tuple[str, ...] = ()) -> task_inference.InferenceConfig:
    """``base`` (a method's preset) with the given task-inference flags (but ``skip``) laid over it; bad values
    exit 2."""
    return config_from(task_inference.InferenceConfig, dataclasses.asdict(base), args,
                       [f for f in INFERENCE_FLAGS if f not in skip])


def add_run_flags(p: argparse.ArgumentParser, default_dataset: str, augment: bool = True) -> None:
    """Data, scenario, task count, validation share and run directory: what every task-sequence CLI takes."""
    add_data_flags(p, default_dataset=default_dataset)
    p.add_argument("--scenario", default="class_split", choices=("class_split", "permuted"))
    p.add_argument("--task_count", type=int, default=None, help="number of tasks (default per dataset)")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="held out of each task's training split (default per dataset: CIFAR-100 0, the "
                        "reference's protocol; 0.1 elsewhere)")
    if augment:  # methods whose presets augment (CIFAR) take a switch to turn it off
        p.add_argument("--no_augment", action="store_true", help="no crop, flip or brightness jitter")
    p.add_argument("--workdir", default=None, help="run directory (default runs/<method>_<dataset>_...)")


def run_settings(args: argparse.Namespace, preset: dict) -> dict:
    """The task sequence's settings (dataset, scenario, seed, val_fraction, task_count), flags over the preset."""
    task_count = args.task_count if args.task_count is not None else preset["task_count"]
    if task_count < 1:
        raise UsageError(f"--task_count must be at least 1, got {task_count}")
    val = args.val_fraction if args.val_fraction is not None else preset["val_fraction"]
    return dict(dataset=args.dataset, scenario=args.scenario, seed=args.seed, val_fraction=val, task_count=task_count)


def build_scenario(cfg: dict, data_dir=None, tfds_dir=None) -> data.Scenario:
    """Load the dataset and cut it into tasks; bad task counts become a UsageError."""
    ds = data.load(cfg["dataset"], data_dir=data_dir, tfds_dir=tfds_dir)
    try:
        return data.build(cfg["scenario"], ds, cfg["task_count"], seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_on_scenario(make_learner: Callable, cfg: dict, workdir, *, title: str, data_dir=None, tfds_dir=None,
                    progress: bool = False, stop_after: int | None = None, echo=print) -> dict:
    """Build the configured scenario and ``make_learner(scenario)``, then ``loop.run`` it; bad settings exit 2."""
    from modkd_jax import loop

    scenario = build_scenario(cfg, data_dir, tfds_dir)
    try:
        learner = make_learner(scenario)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return loop.run(learner, cfg, workdir, progress=progress, stop_after=stop_after, echo=echo,
                    title=f"{title} on {scenario.name}")
