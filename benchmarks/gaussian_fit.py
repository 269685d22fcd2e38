"""Fitting one task's class-conditional Gaussians: the float64 NumPy reference on the host vs the compiled device fit.

    python -m benchmarks.gaussian_fit                 # prints the table, writes benchmarks/results/gaussian_fit.txt
    python -m benchmarks.gaussian_fit --rounds 1 --data_dir ../shared/data/mnist

Data: task 0 of Permuted MNIST (``data.build("permuted", ..., seed=0, val_fraction=0.1)``: the 60000
training images minus the 10 % validation holdout, ~54000 x 784 pixels in [0, 1], 10 classes), and the
same images' features in a fixed random 784-400-400 ReLU MLP (He-initialised from ``jax.random.key(0)``,
no training): a 400-dim space. Settings: 40 Gaussians per task (components 0, 4 per class), rank 30,
shrinkage 0.2; one more row with components 1 (one Gaussian per class).

Per row: seconds per task of ``benchmarks.gaussians_reference.fit_reference`` (float64 NumPy/LAPACK) and
of ``gaussians.fit`` (float32, jitted; the data already on the device; after one warm-up call, whose time
with the compilation is given apart as "first call"), timed alternately for ``--rounds`` rounds (medians;
``block_until_ready``), their ratio, the load average, and the two fits' ``task_log_likelihood`` of the
first 1000 test images: the max abs difference and each fit's mean. With 4 components per class the two
k-means start from different random rows (NumPy's generator vs JAX's), so their mixtures are different
local optima and the difference measures that; with components 1 both fit the same partition (the
classes) and it measures float32 and the subspace iteration.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.gaussians_reference import fit_reference
from modkd_jax import data, gaussians, task_inference

RESULTS = Path(__file__).resolve().parent / "results" / "gaussian_fit.txt"
SETTINGS = dict(shrinkage=0.2, rank=30)
TEST_IMAGES = 1000


def random_features(x: jax.Array, width: int = 400, depth: int = 2, seed: int = 0) -> jax.Array:
    """``x`` through a fixed random ReLU MLP (He initialisation, no biases): ``(n, width)`` float32."""
    keys = jax.random.split(jax.random.key(seed), depth)
    for key in keys:
        x = jax.nn.relu(x @ (jax.random.normal(key, (x.shape[1], width)) * jnp.sqrt(2.0 / x.shape[1])))
    return x


def compare(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, classes: int, *, rounds: int = 2, components: int = 0,
            rank: int = 30, shrinkage: float = 0.2, covariance: str = "component") -> dict:
    """Seconds per fit of the reference and the device fit on one task's ``x`` ``(n, d)``, and how their
    ``task_log_likelihood`` of ``x_test`` differ.

    Args:
      x: the task's training rows (float32).
      y: their task-local labels.
      x_test: rows to score with both fits.
      classes: the task's classes.
      rounds: alternating timed calls of each (medians).
      components, rank, shrinkage, covariance: ``gaussians.fit``'s settings.

    Returns:
      ``reference_s``, ``device_s``, ``first_call_s`` (compilation + one fit), ``speedup``,
      ``ll_max_abs_diff``, ``ll_mean_reference``, ``ll_mean_device`` and ``load`` (1-minute load average).
    """
    kw = dict(components=components, rank=rank, shrinkage=shrinkage, covariance=covariance)
    xd, yd, key = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jax.random.key(0)
    start = time.perf_counter()
    device = common.block(gaussians.fit(xd, yd, classes, key=key, **kw))
    first = time.perf_counter() - start
    ref_s, dev_s = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        ref = fit_reference(x, y, classes, seed=0, **kw)
        ref_s.append(time.perf_counter() - start)
        dev_s.append(common.time_once(lambda: gaussians.fit(xd, yd, classes, key=key, **kw)))
    score = jax.jit(gaussians.task_log_likelihood)
    ll_ref, ll_dev = np.asarray(score(ref, x_test)), np.asarray(score(device, x_test))
    reference, on_device = float(np.median(ref_s)), float(np.median(dev_s))
    return {"reference_s": reference, "device_s": on_device, "first_call_s": first, "speedup": reference / on_device,
            "ll_max_abs_diff": float(np.max(np.abs(ll_ref - ll_dev))), "ll_mean_reference": float(ll_ref.mean()),
            "ll_mean_device": float(ll_dev.mean()), "load": os.getloadavg()[0]}


def spaces(data_dir: str | None) -> dict[str, tuple]:
    """``{name: (train rows, labels, test rows, classes)}``: task 0's pixels and their random-MLP features."""
    task = data.build("permuted", data.load("mnist", data_dir=data_dir), 1, seed=0, val_fraction=0.1).tasks[0]
    x, x_test = task_inference.pixels(task.train.x), task_inference.pixels(task.test.x[:TEST_IMAGES])
    y, classes = np.asarray(task.train.y), len(task.classes)
    feats = jax.jit(random_features)
    return {"pixels": (np.asarray(x), y, x_test, classes),
            "features": (np.asarray(feats(x)), y, feats(x_test), classes)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gaussian_fit", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=None, help="MNIST archives (default: ../shared/data beside the repo)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timed calls of each fit (medians)")
    p.add_argument("--no_write", action="store_true", help=f"only print, do not write {RESULTS.name}")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    lines = [f"# {datetime.date.today().isoformat()}, {common.banner()}",
             f"one Permuted-MNIST task, shrinkage {SETTINGS['shrinkage']}, rank {SETTINGS['rank']}; "
             f"{args.rounds} round(s), medians; log-likelihoods of {TEST_IMAGES} test images"]
    print("\n".join(lines), flush=True)
    rows = []
    for name, (x, y, x_test, classes) in spaces(args.data_dir).items():
        for components in ((0, 1) if name == "pixels" else (0,)):
            r = compare(x, y, x_test, classes, rounds=args.rounds, components=components, **SETTINGS)
            rows.append({"space": f"{name} {x.shape[0]}x{x.shape[1]}",
                         "Gaussians": classes * gaussians.components_for(classes, components),
                         "reference s": f"{r['reference_s']:.2f}", "device s": f"{r['device_s']:.2f}",
                         "speed-up": f"{r['speedup']:.1f}x", "first call s": f"{r['first_call_s']:.2f}",
                         "load": f"{r['load']:.1f}", "max |d ll|": f"{r['ll_max_abs_diff']:.3g}",
                         "mean ll ref": f"{r['ll_mean_reference']:.2f}",
                         "mean ll device": f"{r['ll_mean_device']:.2f}"})
            print(f"  done {rows[-1]['space']}, {rows[-1]['Gaussians']} Gaussians ({common.load()})", flush=True)
    table = common.table(rows, list(rows[0]))
    print(table)
    if not args.no_write:
        command = "$ python -m benchmarks.gaussian_fit" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        RESULTS.write_text("\n".join([command, *lines, table]) + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
