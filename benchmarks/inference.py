"""Class-incremental evaluation of T sub-networks: one compiled call vs. a loop of T jitted forward passes.

    python -m benchmarks.inference                          # T = 2, 5, 10, 20; ResNet-32 and MLP
    python -m benchmarks.inference --archs resnet32 --tasks 10 --batch_size 128
    python -m benchmarks.inference --strategies map          # quick: no vmap (see below)

On XLA:CPU the ``vmap`` strategy turns the per-task ResNet kernels into grouped
convolutions, several times slower than ``map`` and with memory growing as T
(the ResNet-32 ``vmap`` call at T=20 dominates the default run's ~15 minutes on
a loaded 2-core machine); on accelerators it is the one to compare.

MIND's class-incremental rule needs every sub-network's probabilities on every
test batch. The library computes them in one compiled call,
``routing.subnet_probs`` (strategy ``map``: the sub-networks one after another
inside the program; ``vmap``: batched into one program). The alternative a
researcher writes is a Python loop over sub-networks, each a jitted forward pass
(gate the weights with sub-network j's mask, select its batch norm and class
block, softmax); one compilation serves every j (the task id is an argument),
and the loop's T outputs are stacked at the end. A second loop ("gated copy")
gates a copy of the weights outside ``jit`` for each sub-network and batch and
runs a jitted dense forward on it, the pattern of the PyTorch reference (which
deep-copies the model per sub-network per batch). All contenders produce the
same ``(T, batch, classes)`` array (checked here).

Per T and model the table gives the median seconds per evaluated batch (timed
round-robin in one run, so a busy machine slows every contender alike), each
loop's time over the contender's ("loop / this", "copy / this": the speed-up),
the compile time, and the
memory XLA plans for one call (``common.compiled_memory``: arguments + outputs +
temporaries; the loop's figure is per forward pass, plus T outputs held).
Models: MIND's gated ResNet-32 on 32x32x3 (CIFAR-shaped random images) and the
MLP on 28x28x1, 10 classes per task, every sub-network's weights assigned.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from modkd_jax import masks, models, routing
from modkd_jax.models import resnet

STRATEGIES = ("map", "vmap")
INPUTS = {"resnet32": (32, 32, 3), "mlp": (28, 28, 1)}
TEMPERATURE = 6.5
LABELS = {"loop": "loop of T jits", "copy": "loop, gated copy"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="2,5,10,20", help="comma-separated sub-network counts T")
    p.add_argument("--archs", default="resnet32,mlp", help=f"comma-separated, of {sorted(INPUTS)}")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--classes", type=int, default=10, help="classes per task block")
    p.add_argument("--strategies", default="map,vmap", help=f"comma-separated, of {STRATEGIES}")
    p.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds (median reported)")
    p.add_argument("--no_eager_copy", dest="eager_copy", action="store_false",
                   help="leave out the loop that gates a copy of the weights outside jit per sub-network")
    return p


def build(arch: str, tasks: int, classes: int):
    """``(model, params, batch_stats, owner)`` with all ``tasks`` sub-networks assigned (random policy)."""
    model = resnet.resnet32(classes * tasks, tasks) if arch == "resnet32" else models.build("mlp", classes * tasks,
                                                                                              tasks)
    params, stats = models.init(model, jax.random.key(0), INPUTS[arch])
    kinds = models.leaf_kinds(params)
    owner = masks.init_owners(params, kinds, (classes,) * tasks)
    for t in range(tasks):
        owner = masks.assign(owner, kinds, t, tasks, key=jax.random.key(100 + t))
    return model, params, stats, owner


def single_call(model, tasks: int, classes: int, strategy: str):
    """The library's evaluation: every sub-network's probabilities in one jitted call."""
    return jax.jit(lambda p, s, o, x: routing.subnet_probs(model.apply, p, s, o, x, tasks, classes, TEMPERATURE,
                                                           strategy))


def loop_forward(model, classes: int, gate_inside: bool = True):
    """One sub-network's probabilities, jitted once for every task id (the loop's body).

    ``gate_inside=False``: ``params`` arrive already gated (the caller made a
    masked copy of the weights, as the PyTorch reference deep-copies the model
    per sub-network and batch) and ``owner`` is unused.
    """

    @jax.jit
    def forward(params, stats, owner, x, task):
        gated = masks.gate(params, masks.forward_mask(owner, task)) if gate_inside else params
        logits = model.apply({"params": gated, "batch_stats": stats}, x, task, train=False)
        z = jax.lax.dynamic_slice_in_dim(logits, task * classes, classes, axis=-1)
        return jax.nn.softmax(z / TEMPERATURE, axis=-1)

    return forward


def measure(arch: str, tasks: int, args, strategies: list[str]) -> list[dict]:
    """Table rows for one model and one T: each strategy's single call and the loop, timed side by side."""
    model, params, stats, owner = build(arch, tasks, args.classes)
    x = jax.random.normal(jax.random.key(1), (args.batch_size, *INPUTS[arch]))
    contenders, info = {}, {}
    for s in strategies:
        fn = single_call(model, tasks, args.classes, s)
        info[s] = common.compile_stats(fn, params, stats, owner, x)
        contenders[s] = lambda fn=fn: fn(params, stats, owner, x)
    forward = loop_forward(model, args.classes)
    info["loop"] = common.compile_stats(forward, params, stats, owner, x, jnp.int32(0))
    task_ids = [jnp.int32(j) for j in range(tasks)]
    contenders["loop"] = lambda: jnp.stack([forward(params, stats, owner, x, j) for j in task_ids])
    if args.eager_copy:
        dense = loop_forward(model, args.classes, gate_inside=False)
        info["copy"] = common.compile_stats(dense, params, stats, owner, x, jnp.int32(0))
        contenders["copy"] = lambda: jnp.stack([
            dense(masks.gate(params, masks.forward_mask(owner, j)), stats, owner, x, j) for j in task_ids])
    reference = np.asarray(contenders["loop"]())
    for name in contenders:  # same numbers, whichever way they are computed
        np.testing.assert_allclose(np.asarray(contenders[name]()), reference, rtol=1e-4, atol=1e-6)
    secs = common.interleaved(contenders, rounds=args.rounds)
    rows = []
    for name, s in secs.items():
        compile_s, mem = info[name]
        rows.append({"model": arch, "T": tasks, "contender": LABELS.get(name, f"one call ({name})"),
                     "s/batch": f"{s:.4f}", "images/s": f"{args.batch_size / s:.0f}",
                     "loop / this": f"{secs['loop'] / s:.2f}x",
                     "copy / this": f"{secs['copy'] / s:.2f}x" if "copy" in secs else "-",
                     "compile s": f"{compile_s:.1f}",
                     "memory": common.fmt_bytes(mem) + ("" if name in strategies else " per pass")})
    return rows


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        tasks = [int(t) for t in args.tasks.split(",") if t]
    except ValueError:
        tasks = []
    archs = [a for a in args.archs.split(",") if a]
    strategies = [s for s in args.strategies.split(",") if s]
    if (not tasks or min(tasks) < 1 or any(a not in INPUTS for a in archs) or not archs
            or any(s not in STRATEGIES for s in strategies) or min(args.batch_size, args.classes, args.rounds) < 1):
        print(f"error: need positive --tasks, --archs of {sorted(INPUTS)}, --strategies of {list(STRATEGIES)}",
              file=sys.stderr)
        return 2
    print(common.banner())
    print(f"class-incremental evaluation of T sub-networks, batch {args.batch_size}, {args.classes} classes per task; "
          f"{args.rounds} rounds, medians; shared machine: compare ratios within a row group")
    rows = []
    for arch in archs:
        for t in tasks:
            rows += measure(arch, t, args, strategies)
            print(f"  done {arch} T={t} ({common.load()})", flush=True)
    print(common.table(rows, ["model", "T", "contender", "s/batch", "images/s", "loop / this", "copy / this",
                              "compile s", "memory"]))
    for arch in archs:
        for s in strategies:
            mine = [r for r in rows if r["model"] == arch and r["contender"] == f"one call ({s})"]
            print(f"speed-up of one call ({s}) over the loop of T jits, {arch}: "
                  + ", ".join(f"T={r['T']} {r['loop / this']}" for r in mine))
            if args.eager_copy:
                print(f"speed-up of one call ({s}) over the gated-copy loop, {arch}: "
                      + ", ".join(f"T={r['T']} {r['copy / this']}" for r in mine))
    print(f"after timing: {common.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
