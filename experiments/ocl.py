"""Online continual learning with a split ResNet-18 (frozen / shared / task-specific layers).

Setting 1: the datasets in sequence, each seen once (one pass, one batch at a
time); accuracy right after each task (Val1) and after all tasks (Val2), with
the task known (its own layers and head), plus forgetting. Setting 2: batches
drawn at random from the merged pool of all datasets, one pass; at test time
the task is unknown and a rule picks the head (max-probability, or lowest
entropy among the two most confident); its task-identification accuracy is
reported. Every combination of --splits and --batch_sizes is run.

Offline demonstration (MNIST -> Fashion-MNIST, two splits, both settings; ~5 min on 2 CPU cores):

    python -m experiments.ocl --datasets mnist fashion_mnist --batch_sizes 64 \\
        --train_subset 4000 --test_subset 1000 --pretrain digits

Thesis protocol (needs CIFAR through TFDS; GPU recommended):

    python -m experiments.ocl --datasets mnist cifar10 cifar100 fashion_mnist

The workdir holds config.json, results.json (every part's numbers, the tables'
source), PNG plots and one run directory per (setting, split, batch size),
e.g. s1_6.5-2.3-2.4_b64/. A Setting 1 part is a ``modkd_jax.loop`` run (its own
config.json, metrics.jsonl, results.json in the library's one schema, one
checkpoint per task): the same command resumes it after its last finished
task. A Setting 2 part is one pass over one merged stream (no tasks to
checkpoint between): its results.json has the same fields where they apply
(``accuracy`` per task after the stream instead of ``accuracy_matrix``); an
interrupted one runs again from the start. Finished parts are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import UsageError, add_config_flags, config_from, guarded, show_progress
from modkd_jax import data, loop, metrics, rundir, training
from modkd_jax.learner import scenario_fields
from modkd_jax.data.sources import DATASETS
from modkd_jax.methods import split_backbone as sb
from modkd_jax.methods import split_backbone_net as sbn
from modkd_jax.models import convert

THESIS_SPLITS = ("6.5-2.3-2.4", "2.0-4.0-5.2")
FLAGS = ("lr_task", "lr_shared", "optimizer", "momentum", "stem_mode", "temperature", "eval_batch", "eval_split")
HELP = {"lr_task": "learning rate of the task-specific layers", "lr_shared": "learning rate of the shared layers",
        "momentum": "SGD momentum", "temperature": "softmax temperature of the task-ID rules",
        "stem_mode": "ImageNet stem on small inputs: imagenet (7x7/2 + max-pool), no_pool (7x7/2), stride1 (7x7/1)",
        "eval_split": "where Val1/Val2 are measured (val: 10%% of each training set held out)"}
CHOICES = {"optimizer": training.OPTIMIZERS, "stem_mode": tuple(sbn.STEM_MODES), "eval_split": ("test", "val")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.ocl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], choices=DATASETS,
                   help="one task per dataset, in order (thesis: mnist cifar10 cifar100 fashion_mnist)")
    p.add_argument("--settings", nargs="+", type=int, default=[1, 2], choices=(1, 2),
                   help="1: datasets in sequence; 2: random batches from the merged pool")
    p.add_argument("--splits", nargs="+", default=list(THESIS_SPLITS),
                   help="parameter budgets F-S-T in millions (frozen-shared-task specific)")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[64, 256, 512])
    p.add_argument("--init", default="random",
                   help="'random' or an .npz of backbone weights (our layout or a torchvision ResNet-18 "
                        "state dict; see modkd_jax/models/convert.py)")
    p.add_argument("--pretrain", default=None, choices=DATASETS,
                   help="train the whole backbone on this source dataset first (not one of --datasets)")
    p.add_argument("--pretrain_epochs", type=int, default=3)
    p.add_argument("--pretrain_subset", type=int, default=None, help="at most this many source examples")
    p.add_argument("--pretrain_lr", type=float, default=1e-3, help="Adam learning rate of the pre-training")
    p.add_argument("--image_size", type=int, default=32, help="every dataset is resized to this, with 3 channels")
    p.add_argument("--train_subset", type=int, default=None,
                   help="at most this many training examples per dataset (random, from --seed)")
    p.add_argument("--test_subset", type=int, default=None, help="at most this many test examples per dataset")
    p.add_argument("--data_dir", default=None, help="folder with the official archives (default ../shared/data)")
    p.add_argument("--tfds_dir", default=None, help="where TFDS keeps prepared data (env MODKD_TFDS_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="run directory (default runs/ocl_<datasets>_s<seed>)")
    add_config_flags(p, sb.OCLConfig, FLAGS, HELP, CHOICES)
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting of the run, checked; bad values become a UsageError."""
    if len(args.datasets) < 2:
        raise UsageError("--datasets needs at least two datasets (one task each)")
    method = config_from(sb.OCLConfig, {}, args, FLAGS)  # OCLConfig holds the defaults; checks the values
    for name, v in (("--batch_sizes", min(args.batch_sizes)), ("--image_size", args.image_size),
                    ("--pretrain_epochs", args.pretrain_epochs)):
        if v < 1:
            raise UsageError(f"{name} must be at least 1, got {v}")
    for name in ("train_subset", "test_subset", "pretrain_subset"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be at least 1, got {v}")
    if args.pretrain is not None and args.pretrain in args.datasets:
        raise UsageError(f"--pretrain {args.pretrain} is also in --datasets: its examples would be seen twice")
    if args.init != "random":
        if not Path(args.init).is_file():
            raise UsageError(f"--init {args.init}: no such file (give 'random' or an .npz of weights)")
        try:  # the head is never loaded, so any width checks the backbone
            like = jax.eval_shape(lambda: sbn.random_init(10, jax.random.key(0)))
            sbn.check_backbone(*convert.load_any(args.init), like)
        except (ValueError, convert.ConversionError) as exc:
            raise UsageError(f"--init {args.init}: {exc}") from exc
    splits = []
    for text in args.splits:
        try:
            sbn.parse_budget(text)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if text not in splits:
            splits.append(text)
    return dict(datasets=list(args.datasets), settings=sorted(set(args.settings)), splits=splits,
                batch_sizes=list(dict.fromkeys(args.batch_sizes)),
                **{name: getattr(method, name) for name in FLAGS},
                init=args.init if args.init == "random" else str(Path(args.init).resolve()),
                pretrain=args.pretrain, pretrain_epochs=args.pretrain_epochs, pretrain_subset=args.pretrain_subset,
                pretrain_lr=args.pretrain_lr, pretrain_batch=64,
                image_shape=[args.image_size, args.image_size, 3], train_subset=args.train_subset,
                test_subset=args.test_subset, seed=args.seed)


def subset(ds: data.Dataset, train_n: int | None, test_n: int | None, seed: int) -> data.Dataset:
    """A random subset of a dataset's train and test sets (at most ``train_n`` / ``test_n``), drawn from ``seed``."""
    rng = np.random.default_rng([seed, sum(map(ord, ds.name))])
    pick = lambda n, k: np.sort(rng.permutation(n)[:k]) if k is not None and k < n else np.arange(n)  # noqa: E731
    tr, te = pick(len(ds.train_y), train_n), pick(len(ds.test_y), test_n)
    return dataclasses.replace(ds, train_x=ds.train_x[tr], train_y=ds.train_y[tr], test_x=ds.test_x[te],
                               test_y=ds.test_y[te])


def build_scenario(cfg: dict, data_dir=None, tfds_dir=None) -> data.Scenario:
    """The dataset sequence (images resized to ``image_shape``), subsets applied."""
    sets = [subset(data.load(name, data_dir=data_dir, tfds_dir=tfds_dir), cfg["train_subset"], cfg["test_subset"],
                   cfg["seed"]) for name in cfg["datasets"]]
    val = 0.1 if cfg["eval_split"] == "val" else 0.0
    return data.dataset_sequence(sets, shape=tuple(cfg["image_shape"]), seed=cfg["seed"], val_fraction=val)


def initial_backbone(cfg: dict, workdir: Path, data_dir=None, tfds_dir=None, echo=print, progress=False):
    """Backbone every run starts from: the --init file, then --pretrain (cached in the workdir); None = random."""
    init = None
    if cfg["init"] != "random":
        init = convert.load_any(cfg["init"])
    if cfg["pretrain"] is None:
        return init
    cache = workdir / "pretrained_backbone.npz"
    if cache.exists():
        echo(f"pre-trained backbone: {cache} (cached)")
        return convert.load_npz(cache)
    rundir.filter_metrics(workdir, lambda rec: rec.get("run") != "pretrain")  # an interrupted pre-training
    source = subset(data.load(cfg["pretrain"], data_dir=data_dir, tfds_dir=tfds_dir), cfg["pretrain_subset"], None,
                    cfg["seed"])
    split = data.dataset_sequence([source], shape=tuple(cfg["image_shape"]), seed=cfg["seed"],
                                  val_fraction=0.0).tasks[0].train
    key = jax.random.key(cfg["seed"])
    if init is None:
        init = sbn.random_init(source.num_classes, jax.random.fold_in(key, 1), tuple(cfg["image_shape"]))
    t0 = time.perf_counter()
    log = lambda rec: rundir.log_metrics(workdir, {"run": "pretrain", **rec})  # noqa: E731
    params, stats = sb.pretrain(*init, split, source.num_classes, epochs=cfg["pretrain_epochs"],
                                batch_size=cfg["pretrain_batch"], lr=cfg["pretrain_lr"], key=jax.random.fold_in(key, 2),
                                stem_mode=cfg["stem_mode"], mean=(0.5,) * 3, std=(0.5,) * 3, progress=progress, log=log)
    convert.save_npz(cache, jax.device_get(params), jax.device_get(stats))
    echo(f"pre-trained the backbone on {cfg['pretrain']} ({len(split.y)} examples x {cfg['pretrain_epochs']} epochs) "
         f"in {time.perf_counter() - t0:.0f}s")
    return params, stats


def part_name(setting: int, split: str, batch_size: int) -> str:
    """File-safe name of one (setting, split, batch size) run: its run directory under the workdir."""
    return f"s{setting}_{split}_b{batch_size}"


def part_config(cfg: dict, setting: int, split: str, batch_size: int) -> dict:
    """A part's own config.json: the command's settings with one setting, split and batch size."""
    common = {k: v for k, v in cfg.items() if k not in ("settings", "splits", "batch_sizes")}
    return {**common, "setting": setting, "split": split, "batch_size": batch_size}


def method_config(cfg: dict, split: str, batch_size: int) -> sb.OCLConfig:
    """The OCLConfig of one part: the command's method settings with one split and batch size."""
    return sb.OCLConfig(split=split, batch_size=batch_size, **{name: cfg[name] for name in FLAGS})


def part_done(path: Path, task_count: int) -> bool:
    """Whether a part's run directory holds a finished run's results.json."""
    res = path / "results.json"
    return res.is_file() and json.loads(res.read_text()).get("tasks_done") == task_count


def run_setting1(cfg: dict, scenario: data.Scenario, init, split: str, batch_size: int, path: Path,
                 progress: bool, echo) -> dict:
    """Setting 1 through ``modkd_jax.loop.run`` (resumable per task); returns the part's results.json."""
    learner = sb.learner(method_config(cfg, split, batch_size), scenario, init)
    return loop.run(learner, part_config(cfg, 1, split, batch_size), path, progress=progress, echo=echo,
                    title=f"Setting 1, split {split}, batch {batch_size}")


def run_setting2(cfg: dict, scenario: data.Scenario, init, split: str, batch_size: int, path: Path,
                 progress: bool) -> dict:
    """Setting 2: one merged stream from the state Setting 1 starts from; results.json in the same fields.

    Differences from a loop run: one evaluation after the whole stream (``accuracy``:
    ``{rule: per task}``, no ``accuracy_matrix``/forgetting), no checkpoints.
    """
    pcfg = part_config(cfg, 2, split, batch_size)
    path = rundir.open_run(path, pcfg)
    rundir.filter_metrics(path, lambda rec: False)  # an interrupted stream runs again from its start
    m = sb.setup(method_config(cfg, split, batch_size), scenario, init)
    init_key, _ = jax.random.split(jax.random.key(cfg["seed"]))  # loop.run's: Setting 1's initial state
    t0 = time.perf_counter()
    state, accs, info = sb.setting2(m, init_key, cfg["seed"] + batch_size, progress=progress,
                                    log=lambda rec: rundir.log_metrics(path, rec))
    info["seconds"] = time.perf_counter() - t0
    T = scenario.task_count
    results = {"schema": loop.SCHEMA, "method": "split_backbone_merged_stream", "config": pcfg,
               **{k: [list(v) for v in vs] if k == "classes" else list(vs)
                  for k, vs in scenario_fields(scenario).items()},
               "tasks_done": T, "rules": list(sb.RULES), "lead_axes": [], "accuracy": accs,
               "final": {r: float(np.mean(a)) for r, a in accs.items()}, "seconds": info["seconds"],
               "stream_info": info, "params": sb.param_counts(m, state), "split": split, "batch_size": batch_size,
               "groups": sb.groups_report(m.net)}
    rundir.write_json(path / "results.json", results)
    return json.loads((path / "results.json").read_text())


def summary_of(res: dict) -> dict:
    """A part's entry in the workdir's results.json (what the tables and plots read)."""
    cfg = res["config"]
    out = {"setting": cfg["setting"], "split": cfg["split"], "batch_size": cfg["batch_size"], "groups": res["groups"]}
    if cfg["setting"] == 1:
        R = {r: np.asarray(v, float) for r, v in res["accuracy_matrix"].items()}
        til = R["til"]
        out.update(R=R, val1=np.diag(til), val2=til[-1], forgetting=metrics.forgetting(til),
                   summary={rule: res["summary"][rule] for rule in ("til", "cil")},
                   seconds=float(np.sum(res["seconds_per_task"])))
    else:
        out.update(acc=res["accuracy"], mean=res["final"], seconds=res["seconds"])
    return out


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False, echo=print) -> dict:
    """Run (or resume) every configured (setting, split, batch size); returns the results written to results.json."""
    scenario = build_scenario(cfg, data_dir, tfds_dir)
    layers = sbn.layers_for(max(scenario.block_sizes))
    try:
        plans = {split: sbn.resolve_budget(split, layers) for split in cfg["splits"]}
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    workdir = rundir.open_run(workdir, cfg)
    todo = [(s, split, b) for s in cfg["settings"] for split in cfg["splits"] for b in cfg["batch_sizes"]]
    finished = {part_name(*p) for p in todo if part_done(workdir / part_name(*p), scenario.task_count)}
    echo(f"{scenario.name}: {', '.join(f'{t.name} ({len(t.train.y)} train)' for t in scenario.tasks)}, "
         f"inputs {'x'.join(map(str, scenario.input_shape))}, stem {cfg['stem_mode']}")
    for split in cfg["splits"]:
        net = sbn.SplitBackbone(layers, plans[split], scenario.block_sizes)
        echo(f"split {split} -> (millions of parameters; one task copy)\n{sbn.describe(net)}")
    init = None
    if any(part_name(*p) not in finished for p in todo):
        init = initial_backbone(cfg, workdir, data_dir, tfds_dir, echo, progress)
    results = {}
    for setting, split, bs in todo:
        name = part_name(setting, split, bs)
        path = workdir / name
        if name not in finished:
            t0 = time.perf_counter()
            echo(f"{name}:")
            if setting == 1:
                run_setting1(cfg, scenario, init, split, bs, path, progress, echo)
            else:
                run_setting2(cfg, scenario, init, split, bs, path, progress)
            echo(f"finished {name} in {time.perf_counter() - t0:.0f}s")
        results[name] = {**summary_of(json.loads((path / "results.json").read_text())),
                         "results": f"{name}/results.json"}
    out = {"method": "split_backbone_ocl", "config": cfg, "tasks": [t.name for t in scenario.tasks],
           "examples": {"train": [len(t.train.y) for t in scenario.tasks],
                        cfg["eval_split"]: [len(getattr(t, cfg["eval_split"]).y) for t in scenario.tasks]},
           "runs": results}
    rundir.write_json(workdir / "results.json", out)
    out = json.loads((workdir / "results.json").read_text())  # as it reads back (NaN: null), parts in run order
    out["runs"] = {name: out["runs"][name] for name in results}
    plot(workdir, out)
    echo(tables(out))
    return out


def plot(workdir: Path, results: dict) -> None:
    """accuracy_matrices.png (Setting 1, task known) and ocl_summary.png (Val1/Val2 and Setting 2 bars)."""
    runs = results["runs"]
    s1 = {k: v for k, v in runs.items() if v["setting"] == 1}
    s2 = {k: v for k, v in runs.items() if v["setting"] == 2}
    if s1:
        rundir.plot_matrices(workdir / "accuracy_matrices.png",
                             {f"{v['split']} b{v['batch_size']}": v["R"]["til"] for v in s1.values()},
                             title="Setting 1, task known: R[i, j]")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, group, bars, title in (
            (axes[0, 0], s1, (("Val1", lambda v: np.nanmean(np.asarray(v["val1"], float))),
                              ("Val2", lambda v: np.nanmean(np.asarray(v["val2"], float)))),
             "Setting 1 (mean over tasks)"),
            (axes[0, 1], s2, (("task known", lambda v: v["mean"]["til"]),
                              ("task inferred", lambda v: v["mean"]["cil"]),
                              ("task-ID", lambda v: v["mean"]["task_id"])),
             "Setting 2 (merged stream)")):
        labels = [f"{v['split']}\nb{v['batch_size']}" for v in group.values()]
        width = 0.8 / len(bars)
        for i, (name, fn) in enumerate(bars):
            ax.bar(np.arange(len(labels)) + i * width, [100 * (fn(v) or 0.0) for v in group.values()], width,
                   label=name)
        ax.set_xticks(np.arange(len(labels)) + width * (len(bars) - 1) / 2, labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    rundir.save_figure(fig, workdir / "ocl_summary.png")


def _pct(x) -> str:
    return "  n/a" if x is None or not np.isfinite(x) else f"{100 * x:5.1f}"


def tables(results: dict) -> str:
    """The Val1/Val2 table (Setting 1) and the task-identification table (Setting 2)."""
    cfg, tasks = results["config"], results["tasks"]
    ex = results["examples"]
    sub = (f"{ex['train']} train / {ex[cfg['eval_split']]} {cfg['eval_split']} examples per dataset"
           + (" (subsets)" if cfg["train_subset"] or cfg["test_subset"] else ""))
    init = cfg["init"] if cfg["init"] == "random" else Path(cfg["init"]).name
    head = (f"{' -> '.join(tasks)}; one pass; init {init}" + (f" + pre-trained on {cfg['pretrain']}"
                                                              if cfg["pretrain"] else "") + f"; {sub}")
    w = max(14, *(len(t) for t in tasks))
    lines = ["", f"Setting 1 (datasets in sequence, task known): {head}",
             f"{'split':<12} | {'batch':>5} | {'frozen/shared/task M':<20} | {'task':<{w}} | Val1  | Val2  | "
             "Val2 task inferred"]
    lines.append("-" * len(lines[-1]))
    for v in results["runs"].values():
        if v["setting"] != 1:
            continue
        g = "/".join(f"{v['groups'][k]['params'] / 1e6:.2f}" for k in sbn.GROUPS)
        cil = np.asarray(v["R"]["cil"], float)[-1]
        for j, t in enumerate(tasks):
            first = j == 0
            lines.append(f"{v['split'] if first else '':<12} | {v['batch_size'] if first else '':>5} | "
                         f"{g if first else '':<20} | {t:<{w}} | {_pct(v['val1'][j])} | {_pct(v['val2'][j])} | "
                         f"{_pct(cil[j])}")
        lines.append(f"{'':<12} | {'':>5} | {'':<20} | {'mean':<{w}} | {_pct(np.mean(v['val1']))} | "
                     f"{_pct(np.mean(v['val2']))} | {_pct(np.mean(cil))}   forgetting {_pct(v['forgetting'])}")
    if any(v["setting"] == 2 for v in results["runs"].values()):
        lines += ["", f"Setting 2 (random batches from the merged pool, task unknown at test): {head}",
                  f"{'split':<12} | {'batch':>5} | {'task':<{w}} | task known | task inferred (max-p) | "
                  "task-ID max-p | task-ID top-2 entropy"]
        lines.append("-" * len(lines[-1]))
        for v in results["runs"].values():
            if v["setting"] != 2:
                continue
            a = v["acc"]
            for j, t in enumerate([*tasks, "mean"]):
                get = (lambda r: a[r][j]) if j < len(tasks) else (lambda r: v["mean"][r])
                lines.append(f"{v['split'] if j == 0 else '':<12} | {v['batch_size'] if j == 0 else '':>5} | "
                             f"{t:<{w}} | {_pct(get('til')):>10} | {_pct(get('cil')):>21} | "
                             f"{_pct(get('task_id')):>13} | {_pct(get('task_id_top2_entropy')):>21}")
    return "\n".join(lines)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = resolve_config(args)
    workdir = args.workdir or f"runs/ocl_{'_'.join(cfg['datasets'])}_s{cfg['seed']}"
    run(cfg, workdir, data_dir=args.data_dir, tfds_dir=args.tfds_dir, progress=show_progress())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
