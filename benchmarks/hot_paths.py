"""The hot paths side by side in one run: host overhead per training step, data-parallel vs plain jit,
backend compiles per task, Gaussian fit seconds per task before / after.

    python -m benchmarks.hot_paths            # writes benchmarks/results/hot_paths.txt
    python -m benchmarks.hot_paths --quick    # fewer steps and a smaller compile run (the smoke test)

1. ``training.run_phase``'s cost per step beyond the step itself: the same epochs of the same MIND step
   (MLP, MNIST-shaped, batch 128) run (a) by ``run_phase`` (one compiled call per step that gathers its
   batch on the device), (b) as one compiled ``fori_loop`` over the same fused step (the device's time
   alone, no dispatch), and (c) by the host loop ``run_phase`` used before (``host_loop``: host batches,
   an eager ``fold_in`` and metric adds per step). Overhead = (a) - (b), and (c) - (b) for the old loop.
2. ``benchmarks.dp_overhead`` (its own process: 2 simulated CPU devices): the data-parallel step against
   ``jax.jit`` on the same 2 devices and on one.
3. Backend compiles of every task of a 5-task class-split MIND run with unequal task sizes (the loop's
   ``compiles`` per task), for ``--task_inference auto`` and ``max_prob``.
4. points to ``benchmarks.gaussian_fit`` (one task's Gaussian statistics, the float64 NumPy reference
   against the device fit), which writes its own table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, gaussian_fit, scaling
from modkd_jax import data, loop, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Split
from modkd_jax.methods import mind
from modkd_jax.task_inference import InferenceConfig

RESULTS = Path(__file__).with_name("results") / "hot_paths.txt"
BATCH = 128


def host_loop(step, carry, split, ctx, batch_size: int, key):
    """One epoch the way ``run_phase`` ran before: host-side batches, eager key folding and metric adds."""
    bkey, akey = jax.random.split(key)
    sums, count = None, 0
    for i, (x, y) in enumerate(batching.epoch_batches(split.x, split.y, batch_size, bkey, drop_remainder=True)):
        carry, m = step(carry, training.Batch(x, y), jax.random.fold_in(akey, i), ctx)
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        count += 1
    return carry, {k: float(v) / count for k, v in sums.items()}


def step_overhead(n: int = 12800, epochs: int = 3, arch: str = "mlp", batch: int = BATCH) -> dict:
    """ms per step of ``run_phase`` (both loops), the step alone and the old host loop; ``n // batch`` steps
    an epoch.

    The step alone is the jitted step called again and again on one batch already on the device (its own
    dispatch included, no gather, no metrics): what a training step cannot do without. ``arch``: the MIND
    step of ``scaling.step_setup`` (``"mlp"``: 5 tasks of 2 classes, MNIST-shaped; ``"resnet32"``: 10 tasks
    of 10 classes, CIFAR-shaped, crop+flip).
    """
    tasks, classes = (5, 2) if arch == "mlp" else (10, 10)
    step, rest, carry = scaling.step_setup(arch, tasks, classes, batch)
    ctx = rest[-1]
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (n, *scaling.INPUTS[arch]), dtype=np.uint8),
                  rng.integers(0, classes, n).astype(np.int32), np.zeros(n, np.int32))
    placed = training.place_split(split)
    count = n // batch
    phase = training.Phase(epochs, batch, 0.005)
    fresh = lambda: jax.tree.map(jnp.copy, carry)  # noqa: E731  (the steps donate their carry)
    alone = scaling.runner(step, rest, fresh())
    key = jax.random.key(1)
    contenders = {
        "epoch": lambda: training.run_phase(step, fresh(), placed, ctx, phase, key, loop="epoch"),
        "step": lambda: training.run_phase(step, fresh(), placed, ctx, phase, key, loop="step"),
        "alone": lambda: [alone() for _ in range(epochs * count)][-1],
        "host_loop": lambda: [host_loop(step, fresh(), split, ctx, batch, jax.random.fold_in(key, e))
                              for e in range(epochs)][-1][0],
    }
    secs = common.interleaved(contenders, rounds=3)
    ms = {k: 1000 * v / (epochs * count) for k, v in secs.items()}
    auto = training.loop_for("auto", convolves=arch != "mlp")
    return {**{f"{k}_ms": v for k, v in ms.items()}, "auto": auto, "run_phase_ms": ms[auto],
            "overhead_ms": ms[auto] - ms["alone"], "old_overhead_ms": ms["host_loop"] - ms["alone"],
            "steps": epochs * count}


def compiles_per_task(rule: str) -> list[int]:
    """Backend compiles of each task of a 5-task class-split MIND run (MNIST, unequal task sizes)."""
    ds = data.load("mnist", data_dir=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    sc = data.build("class_split", ds, 5, seed=0, val_fraction=0.1)
    cfg = mind.preset_config("mnist", epochs=1, distill_epochs=1, inference=InferenceConfig(task_inference=rule))
    res = loop.run(mind.learner(cfg, sc), {"seed": 0}, None, echo=None)
    return [int(i["compiles"]) for i in res["task_infos"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    lines = [f"$ python -m benchmarks.hot_paths{' --quick' if args.quick else ''}", common.banner()]
    t0 = time.perf_counter()
    so = step_overhead(n=2560 if args.quick else 12800, epochs=1 if args.quick else 3)
    lines += ["", f"1. run_phase cost per step beyond the step itself (MIND MLP step, batch {BATCH}; median of 3 "
              "alternating rounds; 'auto' uses the " + so["auto"] + " loop on this backend)",
              common.table([{"loop": "run_phase, one compiled call per epoch", "ms/step": f"{so['epoch_ms']:.3f}",
                             "beyond the step": f"{so['epoch_ms'] - so['alone_ms']:.3f}"},
                            {"loop": "run_phase, one compiled call per step", "ms/step": f"{so['step_ms']:.3f}",
                             "beyond the step": f"{so['step_ms'] - so['alone_ms']:.3f}"},
                            {"loop": "the step alone (one batch, already placed)", "ms/step": f"{so['alone_ms']:.3f}",
                             "beyond the step": "0"},
                            {"loop": "the previous host loop", "ms/step": f"{so['host_loop_ms']:.3f}",
                             "beyond the step": f"{so['old_overhead_ms']:.3f}"}],
                           ["loop", "ms/step", "beyond the step"]),
              f"goal: <= 0.1 ms beyond the step; {so['steps']} steps per contender; {common.load()}"]
    dp = subprocess.run([sys.executable, "-m", "benchmarks.dp_overhead", "--steps", "100" if args.quick else "200",
                         *(["--no_write"] if args.quick else [])], capture_output=True, text=True, check=True)
    lines += ["", "2. data-parallel step on 2 CPU devices vs jax.jit (benchmarks.dp_overhead, its own process)",
              dp.stdout.rstrip()]
    rows = [{"task_inference": rule, **{f"task {t + 1}": c for t, c in enumerate(compiles_per_task(rule))}}
            for rule in ("auto", "max_prob")]
    lines += ["", "3. backend compiles per task, MIND on Split MNIST (5 tasks, unequal sizes, 1 epoch per phase)",
              common.table(rows, list(rows[0])), "goal: 0 in tasks 2-5"]
    lines += ["", "4. Gaussian statistics of one task: python -m benchmarks.gaussian_fit (its own table, "
              f"{gaussian_fit.__name__.replace('.', '/')}.py -> benchmarks/results/gaussian_fit.txt)"]
    lines += ["", f"{time.perf_counter() - t0:.0f} s in all; {common.load()}", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
