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

The workdir is the run: config.json, metrics.jsonl, results.json, PNG plots;
each finished (setting, split, batch size) is kept under parts/ and skipped
when the same command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import UsageError, guarded, show_progress
from modkd_jax import data, metrics, rundir
from modkd_jax.data.sources import DATASETS
from modkd_jax.methods import split_backbone as sb
from modkd_jax.models import convert

THESIS_SPLITS = ("6.5-2.3-2.4", "2.0-4.0-5.2")


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
    p.add_argument("--lr_task", type=float, default=0.01, help="learning rate of the task-specific layers")
    p.add_argument("--lr_shared", type=float, default=0.001, help="learning rate of the shared layers")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--init", default="random",
                   help="'random' or an .npz of backbone weights (our layout or a torchvision ResNet-18 "
                        "state dict; see modkd_jax/models/convert.py)")
    p.add_argument("--pretrain", default=None, choices=DATASETS,
                   help="train the whole backbone on this source dataset first (not one of --datasets)")
    p.add_argument("--pretrain_epochs", type=int, default=3)
    p.add_argument("--pretrain_subset", type=int, default=None, help="at most this many source examples")
    p.add_argument("--pretrain_lr", type=float, default=1e-3, help="Adam learning rate of the pre-training")
    p.add_argument("--stem_mode", default="no_pool", choices=tuple(sb.STEM_MODES),
                   help="ImageNet stem on small inputs: imagenet (7x7/2 + max-pool), no_pool (7x7/2), stride1 (7x7/1)")
    p.add_argument("--image_size", type=int, default=32, help="every dataset is resized to this, with 3 channels")
    p.add_argument("--train_subset", type=int, default=None,
                   help="at most this many training examples per dataset (random, from --seed)")
    p.add_argument("--test_subset", type=int, default=None, help="at most this many test examples per dataset")
    p.add_argument("--eval_split", default="test", choices=("test", "val"),
                   help="where Val1/Val2 are measured (val: 10%% of each training set held out)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the task-ID rules")
    p.add_argument("--eval_batch", type=int, default=256)
    p.add_argument("--data_dir", default=None, help="folder with the official archives (default ../shared/data)")
    p.add_argument("--tfds_dir", default=None, help="where TFDS keeps prepared data (env MODKD_TFDS_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="run directory (default runs/ocl_<datasets>_s<seed>)")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Every effective setting of the run, checked; bad values become a UsageError."""
    if len(args.datasets) < 2:
        raise UsageError("--datasets needs at least two datasets (one task each)")
    for name, v in (("--batch_sizes", min(args.batch_sizes)), ("--image_size", args.image_size),
                    ("--eval_batch", args.eval_batch), ("--pretrain_epochs", args.pretrain_epochs)):
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
            like = jax.eval_shape(lambda: sb.random_init(10, jax.random.key(0)))
            sb.check_backbone(*convert.load_any(args.init), like)
        except (ValueError, convert.ConversionError) as exc:
            raise UsageError(f"--init {args.init}: {exc}") from exc
    splits = []
    for text in args.splits:
        try:
            sb.parse_budget(text)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if text not in splits:
            splits.append(text)
    return dict(datasets=list(args.datasets), settings=sorted(set(args.settings)), splits=splits,
                batch_sizes=list(dict.fromkeys(args.batch_sizes)), lr_task=args.lr_task, lr_shared=args.lr_shared,
                optimizer=args.optimizer, momentum=args.momentum,
                init=args.init if args.init == "random" else str(Path(args.init).resolve()),
                pretrain=args.pretrain, pretrain_epochs=args.pretrain_epochs, pretrain_subset=args.pretrain_subset,
                pretrain_lr=args.pretrain_lr, pretrain_batch=64, stem_mode=args.stem_mode,
                image_shape=[args.image_size, args.image_size, 3], train_subset=args.train_subset,
                test_subset=args.test_subset, eval_split=args.eval_split, temperature=args.temperature,
                eval_batch=args.eval_batch, seed=args.seed)


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
    source = subset(data.load(cfg["pretrain"], data_dir=data_dir, tfds_dir=tfds_dir), cfg["pretrain_subset"], None,
                    cfg["seed"])
    split = data.dataset_sequence([source], shape=tuple(cfg["image_shape"]), seed=cfg["seed"],
                                  val_fraction=0.0).tasks[0].train
    key = jax.random.key(cfg["seed"])
    if init is None:
        init = sb.random_init(source.num_classes, jax.random.fold_in(key, 1), tuple(cfg["image_shape"]))
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
    """File-safe name of one (setting, split, batch size) run."""
    return f"s{setting}_{split}_b{batch_size}"


def _keep_finished_metrics(workdir: Path, finished: set[str]) -> None:
    """Drop metric lines of runs that did not finish (left by an interrupted command)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("run") in finished
            | ({"pretrain"} if (workdir / "pretrained_backbone.npz").exists() else set())]
    path.write_text("".join(line + "\n" for line in keep))


def run_part(cfg: dict, scenario: data.Scenario, init, setting: int, split: str, batch_size: int, log,
             progress: bool) -> dict:
    """One (setting, split, batch size) run from the initial backbone; returns its JSON-ready result."""
    key = jax.random.key(cfg["seed"])
    net, params, stats = sb.build(split, scenario.block_sizes, jax.random.fold_in(key, 3), init=init,
                                  stem_mode=cfg["stem_mode"], mean=tuple(scenario.norm[0]), std=tuple(scenario.norm[1]),
                                  input_shape=scenario.input_shape)
    tx = sb.make_optimizer(cfg["lr_shared"], cfg["lr_task"], cfg["optimizer"], cfg["momentum"])
    evals = [getattr(t, cfg["eval_split"]) for t in scenario.tasks]
    common = dict(batch_size=batch_size, tx=tx, eval_splits=evals, eval_batch=cfg["eval_batch"],
                  temperature=cfg["temperature"], progress=progress)
    t0 = time.perf_counter()
    out = {"setting": setting, "split": split, "batch_size": batch_size,
           "groups": {g: {"params": net.sizes()[g], "layers": [layer.name for layer in net.layers_of(g)]}
                      for g in sb.GROUPS}}
    if setting == 1:
        _, _, R = sb.setting1(net, params, stats, scenario, key=jax.random.fold_in(key, 4 + batch_size), log=log,
                              **common)
        til = R["til"]
        out.update(R=R, val1=np.diag(til), val2=til[-1], forgetting=metrics.forgetting(til),
                   summary={rule: metrics.summarize(R[rule]) for rule in ("til", "cil")})
    else:
        _, _, accs = sb.setting2(net, params, stats, scenario, seed=cfg["seed"] + batch_size, log=log, **common)
        out.update(acc=accs, mean={rule: float(np.mean(v)) for rule, v in accs.items()})
    out["seconds"] = time.perf_counter() - t0
    return out


def run(cfg: dict, workdir: str | Path, *, data_dir=None, tfds_dir=None, progress: bool = False, echo=print) -> dict:
    """Run (or resume) every configured (setting, split, batch size); returns the results written to results.json."""
    scenario = build_scenario(cfg, data_dir, tfds_dir)
    layers = sb.layers_for(max(scenario.block_sizes))
    try:
        plans = {split: sb.resolve_budget(split, layers) for split in cfg["splits"]}
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    workdir = rundir.open_run(workdir, cfg)
    parts_dir = workdir / "parts"
    parts_dir.mkdir(exist_ok=True)
    todo = [(s, split, b) for s in cfg["settings"] for split in cfg["splits"] for b in cfg["batch_sizes"]]
    finished = {p.stem for p in parts_dir.glob("*.json")}
    _keep_finished_metrics(workdir, finished)
    echo(f"{scenario.name}: {', '.join(f'{t.name} ({len(t.train.y)} train)' for t in scenario.tasks)}, "
         f"inputs {'x'.join(map(str, scenario.input_shape))}, stem {cfg['stem_mode']}")
    for split in cfg["splits"]:
        net = sb.SplitBackbone(layers, plans[split], scenario.block_sizes)
        echo(f"split {split} -> (millions of parameters; one task copy)\n{sb.describe(net)}")
    init = None
    if any(part_name(*p) not in finished for p in todo):
        init = initial_backbone(cfg, workdir, data_dir, tfds_dir, echo, progress)
    results = {}
    for setting, split, bs in todo:
        name = part_name(setting, split, bs)
        path = parts_dir / f"{name}.json"
        if name in finished:
            results[name] = json.loads(path.read_text())
            continue
        log = lambda rec, name=name: rundir.log_metrics(workdir, {"run": name, **rec})  # noqa: E731
        res = run_part(cfg, scenario, init, setting, split, bs, log, progress)
        rundir.write_json(path, res)
        results[name] = json.loads(path.read_text())
        echo(f"finished {name} in {res['seconds']:.0f}s")
    out = {"method": "split_backbone_ocl", "config": cfg, "tasks": [t.name for t in scenario.tasks],
           "examples": {"train": [len(t.train.y) for t in scenario.tasks],
                        cfg["eval_split"]: [len(getattr(t, cfg["eval_split"]).y) for t in scenario.tasks]},
           "runs": results}
    rundir.write_json(workdir / "results.json", out)
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
        g = "/".join(f"{v['groups'][k]['params'] / 1e6:.2f}" for k in sb.GROUPS)
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
                  "task-ID max-p | task-ID entropy"]
        lines.append("-" * len(lines[-1]))
        for v in results["runs"].values():
            if v["setting"] != 2:
                continue
            a = v["acc"]
            for j, t in enumerate([*tasks, "mean"]):
                get = (lambda r: a[r][j]) if j < len(tasks) else (lambda r: v["mean"][r])
                lines.append(f"{v['split'] if j == 0 else '':<12} | {v['batch_size'] if j == 0 else '':>5} | "
                             f"{t:<{w}} | {_pct(get('til')):>10} | {_pct(get('cil')):>21} | "
                             f"{_pct(get('task_id')):>13} | {_pct(get('task_id_entropy')):>15}")
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
