"""Per-step overhead of ``parallel.data_parallel``: the same small MIND train step, plain jit vs a 2-device mesh.

    python -m benchmarks.dp_overhead          # writes benchmarks/results/dp_overhead.txt

The step is ``benchmarks.scaling``'s gated train step (``training.make_step`` on
MIND's cross-entropy loss, Adam through ``optim.gated``) of the last sub-network
of an MLP student on MNIST-shaped inputs (5 tasks of 2 classes, batch 64). It
runs (a) as the plain jitted step on one device and (b) wrapped by
``parallel.data_parallel`` on a mesh of 2 simulated CPU devices, its arguments
placed once beforehand (batch split along ``data``, the rest replicated), as a
training loop keeps them, and (c) as ``jax.jit`` with the same shardings and
no wrapper: the floor, what XLA's 2-device program itself costs. All three are
timed in one process, alternating rounds (``common.interleaved``): (b) against
(c) is what the wrapper adds per call (argument checks, placement), (c) against
(a) the 2-device program's own cost. The 2 simulated devices share the host's
cores (and its load): this is overhead, not speed-up.
"""

from __future__ import annotations

import os

# Before JAX starts: 2 simulated CPU devices, single-threaded kernels per device (as in benchmarks.scaling: a
# collective blocking a shared intra-op thread can deadlock XLA:CPU). Flags already given are kept.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
                               " --xla_cpu_multi_thread_eigen=false").strip()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common, scaling  # noqa: E402
from modkd_jax import parallel  # noqa: E402

ARCH, TASKS, CLASSES, BATCH = "mlp", 5, 2, 64
RESULTS = Path(__file__).with_name("results") / "dp_overhead.txt"
COMMAND = "python -m benchmarks.dp_overhead"


def replicated_copy(mesh, tree):
    """A copy of ``tree`` on every device of ``mesh`` that shares no buffer with ``tree`` (the steps donate it)."""
    return parallel.replicate(mesh, jax.tree.map(jnp.copy, tree))


def contenders() -> tuple[dict, parallel.DataParallel]:
    """Runners of the plain jitted step, the data-parallel one on 2 devices, and ``jax.jit`` with the same shardings.

    Every contender has a carry of its own (the steps donate it); the mesh contenders' arguments are placed once.
    The last one is the floor: XLA's 2-device program without the wrapper's per-call checks.
    """
    step, rest, carry = scaling.step_setup(ARCH, TASKS, CLASSES, BATCH)
    mesh = parallel.make_mesh(data=2)
    sharded = parallel.data_parallel(step, mesh)
    rep = parallel.replicated(mesh)
    floor = jax.jit(step, in_shardings=(rep, parallel.batch_sharding(mesh), rep, rep), out_shardings=rep,
                    donate_argnums=0)
    batch, *others = rest
    placed = (parallel.shard_batch(mesh, batch), *parallel.replicate(mesh, tuple(others)))
    return {"jit": scaling.runner(step, rest, carry),
            "data_parallel": scaling.runner(sharded, placed, replicated_copy(mesh, carry)),
            "mesh_jit": scaling.runner(floor, placed, replicated_copy(mesh, carry))}, sharded


def compare(steps: int = 200, rounds: int = 10) -> dict:
    """ms/step of each contender (median of ``rounds`` alternating rounds of ``steps // rounds`` steps each)."""
    if jax.device_count() < 2:
        raise RuntimeError("needs 2 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=2 before JAX starts")
    runs, sharded = contenders()
    load_before = os.getloadavg()[0]
    secs = common.interleaved(runs, rounds=rounds, calls=max(1, steps // rounds))
    return {"jit_ms": 1000 * secs["jit"], "dp_ms": 1000 * secs["data_parallel"], "mesh_jit_ms": 1000 * secs["mesh_jit"],
            "ratio": secs["jit"] / secs["data_parallel"],  # steps/s of dp over steps/s of jit
            "floor_ratio": secs["mesh_jit"] / secs["data_parallel"],  # the wrapper's cost: dp vs jit, same mesh
            "mesh_jit_ratio": secs["jit"] / secs["mesh_jit"],
            "dp_programs": sharded.compiled_count(), "load_before": load_before, "load_after": os.getloadavg()[0]}


def report(result: dict, steps: int) -> str:
    """The result as the text of ``RESULTS``: the command, the set-up, one table, the loads."""
    rows = [{"step": "plain jax.jit, 1 device", "ms/step": f"{result['jit_ms']:.3f}", "steps/s vs 1-device jit": "1.00x",
             "steps/s vs 2-device jit": "-"},
            {"step": "parallel.data_parallel, 2 devices", "ms/step": f"{result['dp_ms']:.3f}",
             "steps/s vs 1-device jit": f"{result['ratio']:.2f}x",
             "steps/s vs 2-device jit": f"{result['floor_ratio']:.2f}x"},
            {"step": "jax.jit with the mesh shardings, 2 devices (floor)", "ms/step": f"{result['mesh_jit_ms']:.3f}",
             "steps/s vs 1-device jit": f"{result['mesh_jit_ratio']:.2f}x", "steps/s vs 2-device jit": "1.00x"}]
    return "\n".join([
        f"$ {COMMAND}", common.banner(),
        f"{ARCH}, {TASKS} tasks of {CLASSES} classes, batch {BATCH}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"{steps} steps each in alternating rounds, medians; data-parallel programs compiled: {result['dp_programs']}",
        common.table(rows, list(rows[0])),
        "goal: data_parallel >= 0.9x the steps/s of jax.jit on the same 2 devices (what the wrapper costs per call); "
        "the 2-device program against 1 device is XLA's own cost on 2 simulated devices sharing the cores",
        f"load average {result['load_before']:.2f} before timing, {result['load_after']:.2f} after "
        f"on {os.cpu_count()} CPU(s)", ""])


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--no_write", action="store_true", help=f"print only (do not write {RESULTS.name})")
    args = ap.parse_args(argv)
    text = report(compare(args.steps), args.steps)
    print(text, end="")
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
