"""How cost grows with the number of tasks, and throughput vs. devices and processes on simulated CPU meshes.

    python -m benchmarks.scaling                                  # 10, 100, 1000 tasks; 1, 2, 4, 8 devices
    python -m benchmarks.scaling --tasks 10,100 --devices 1,2 --arch mlp
    python -m benchmarks.scaling --skip memory,steps,devices --arch mlp   # processes only

Four figures:

1. **Owner-map memory vs. task count.** Every parameter leaf has one int16
   owner map (``masks.OWNER_DTYPE``), so the bookkeeping of T sub-networks costs
   2 bytes per parameter whatever T is; only the parameters grow with T (the
   classifier's class blocks and the per-task batch-norm rows). The table sets
   this against keeping one mask per task (as bool, or as float32 multiplied
   into the weights, the PyTorch reference's way), which grows as T x params.
   Shapes only (``jax.eval_shape``): nothing is allocated.
2. **Train step time vs. task count.** The gated train step
   (``training.make_step`` on MIND's cross-entropy ``methods.mind.make_loss``,
   crop+flip, Adam through ``optim.gated``) of the last sub-network of a
   T-task student, timed side by side for every T.
   The owner maps give each gated weight a random task in [0, T) (what T
   assignments amount to; the step's speed does not depend on who owns what).
3. **Throughput vs. devices.** The same step, data-parallel with
   ``parallel.data_parallel`` over meshes of 1, 2, 4 and 8 devices, in a child
   process started with ``--xla_force_host_platform_device_count=8`` (XLA_FLAGS
   must be set before JAX starts) and single-threaded kernels per device (as in
   ``tests/parallel_check.py``: a collective blocking a shared intra-op thread
   can deadlock XLA:CPU). Simulated devices share the host's cores, so on a
   2-core machine this measures the cost of sharding and all-reduces, not a
   speed-up; the plain step of this process (one device, multi-threaded
   kernels) is printed beside it for reference. On a GPU box or a TPU pod the
   same command spans real devices.
4. **Step time and input bytes vs. processes.** The same data-parallel step on
   a 2-device mesh built two ways on this host: 1 process x 2 CPU devices, and
   2 processes x 1 CPU device each joined by ``jax.distributed`` on localhost
   (gloo collectives), as the hosts of a pod are. Every timed step feeds the
   global batch from host memory through ``parallel.shard_batch``, so each
   process hands JAX only its own rows: the table gives each process's input
   bytes per step and the step time relative to 1 process. Both layouts run
   two single-threaded devices on the same cores, so the ratio is the cost of
   crossing processes (gloo all-reduces, two Python dispatchers), not a
   speed-up. 1x2 vs 2x1 rather than 1x4 vs 2x2: four devices would
   oversubscribe a 2-core host. Then a paper estimate (arithmetic on stated
   assumptions, not a measurement) of the input bandwidth each host of a pod
   needs for CIFAR-100-sized and ImageNet-sized runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from modkd_jax import masks, models, training
from modkd_jax.methods import mind
from modkd_jax.models import resnet

INPUTS = {"resnet32": (32, 32, 3), "mlp": (28, 28, 1)}
MEAN_STD = {"resnet32": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), "mlp": ((0.1307,), (0.3081,))}
WORKER_FLAG = "--_devices_worker"
PROCESSES_FLAG = "--_processes_worker"
LAYOUTS = ((1, 2), (2, 1))  # (processes, CPU devices per process): the same 2-device mesh either way
# Paper estimate of input bandwidth per host: (dataset, form handed over, bytes per image, steps/s assumed).
ESTIMATE_BATCH, ESTIMATE_HOSTS = 4096, (4, 8)  # global batch; hosts of a v4-32 / v4-64 style pod (4 chips each)
ESTIMATE = (("CIFAR-100", "32x32x3 uint8", 32 * 32 * 3, 10.0),
            ("ImageNet", "224x224x3 uint8, decoded", 224 * 224 * 3, 5.0),
            ("ImageNet", "JPEG, ~110 KB, before decode", 110_000, 5.0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="10,100,1000", help="comma-separated task counts")
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated mesh sizes (simulated CPU devices)")
    p.add_argument("--arch", default="resnet32", choices=sorted(INPUTS))
    p.add_argument("--classes", type=int, default=10, help="classes per task block")
    p.add_argument("--batch_size", type=int, default=64, help="global batch (divisible by every mesh size, and by 2)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds (median reported)")
    p.add_argument("--steps", type=int, default=2, help="steps per timing round")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: memory, steps, devices, processes")
    return p


def build(arch: str, tasks: int, classes: int):
    """The gated student for ``tasks`` tasks of ``classes`` classes."""
    if arch == "resnet32":
        return resnet.resnet32(classes * tasks, tasks)
    return models.build("mlp", classes * tasks, tasks)


def param_shapes(arch: str, tasks: int, classes: int):
    """Parameter shapes (``ShapeDtypeStruct`` pytree) of the student, without allocating them."""
    model = build(arch, tasks, classes)
    return jax.eval_shape(lambda: models.init(model, jax.random.key(0), INPUTS[arch])[0])


def memory_row(arch: str, tasks: int, classes: int) -> dict:
    """Parameter and owner-map bytes for ``tasks`` tasks, against one stored mask per task."""
    shapes = param_shapes(arch, tasks, classes)
    count = models.param_count(shapes)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    owner_bytes = count * jnp.dtype(masks.OWNER_DTYPE).itemsize
    return {"tasks": tasks, "params": f"{count:,}", "param bytes": common.fmt_bytes(param_bytes),
            "owner maps": common.fmt_bytes(owner_bytes), "owner / params": f"{owner_bytes / param_bytes:.2f}",
            "T bool masks": common.fmt_bytes(tasks * count), "T float32 masks": common.fmt_bytes(tasks * 4 * count)}


def synthetic_owner(params, kinds, tasks: int, classes: int, seed: int = 0):
    """Owner maps with every gated weight owned by a random task in [0, tasks) (as after ``tasks`` assignments)."""
    owner = masks.init_owners(params, kinds, (classes,) * tasks)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda o, k: jnp.asarray(rng.integers(0, tasks, o.shape), o.dtype) if k == masks.GATED else o,
                        owner, kinds)


def step_setup(arch: str, tasks: int, classes: int, batch: int):
    """(jitted gated train step, its arguments after the carry, a fresh carry) for the last of ``tasks``."""
    model = build(arch, tasks, classes)
    params, stats = models.init(model, jax.random.key(0), INPUTS[arch])
    kinds = models.leaf_kinds(params)
    owner = synthetic_owner(params, kinds, tasks, classes)
    t = tasks - 1
    mean, std = MEAN_STD[arch]
    tx = training.make_optimizer("adam", 0.005)
    step = training.make_step(mind.make_loss(model.apply, classes), tx,
                              training.augmenting(mean, std, crop_flip=arch == "resnet32"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (batch, *INPUTS[arch]), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, classes, (batch,)).astype(np.int32))
    ctx = mind.Context(jnp.int32(t), masks.forward_mask(owner, t), masks.trainable_mask(owner, t))
    rest = (training.Batch(x, y), jax.random.key(0), ctx)
    return step, rest, (params, stats, tx.init(params))


def runner(step, rest, carry):
    """A no-argument callable running one step on a carry it keeps (the step donates it)."""
    state = {"carry": carry}

    def run():
        state["carry"], m = step(state["carry"], *rest)
        return m["loss"]

    return run


def step_rows(args, tasks: list[int]) -> list[dict]:
    """Step time and compiled memory of the gated train step for each task count, timed side by side."""
    contenders, info = {}, {}
    for t in tasks:
        step, rest, carry = step_setup(args.arch, t, args.classes, args.batch_size)
        info[t] = common.compile_stats(step, carry, *rest)
        contenders[t] = runner(step, rest, carry)
    secs = common.interleaved(contenders, rounds=args.rounds, calls=args.steps)
    base = secs[tasks[0]]
    return [{"tasks": t, "s/step": f"{s:.4f}", "images/s": f"{args.batch_size / s:.0f}",
             f"vs {tasks[0]} tasks": f"{s / base:.2f}x", "compile s": f"{info[t][0]:.1f}",
             "step memory": common.fmt_bytes(info[t][1])} for t, s in secs.items()]


# ----------------------------------------------------------------------------- devices (child process)


def devices_worker(args) -> int:
    """In the child process: the step on meshes of each size, timed round-robin; prints one JSON line."""
    from modkd_jax import parallel  # imported here: after XLA_FLAGS took effect

    sizes = [int(n) for n in args.devices.split(",")]
    tasks = int(args.tasks.split(",")[0])
    contenders = {}
    for n in sizes:
        step, rest, carry = step_setup(args.arch, tasks, args.classes, args.batch_size)
        mesh = parallel.make_mesh(data=n)
        sharded = parallel.data_parallel(step, mesh)
        batch, *others = rest  # placed once: the batch split along "data", the rest on every device
        placed = (parallel.shard_batch(mesh, batch), *parallel.replicate(mesh, tuple(others)))
        contenders[n] = runner(sharded, placed, parallel.replicate(mesh, carry))
    secs = common.interleaved(contenders, rounds=args.rounds, calls=args.steps)
    print(json.dumps({"devices": jax.device_count(), "secs": {str(n): s for n, s in secs.items()}}))
    return 0


def device_rows(args, argv: list[str]) -> list[dict]:
    """Run ``devices_worker`` in a child process with simulated CPU devices; the plain step here for reference."""
    sizes = [int(n) for n in args.devices.split(",")]
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={max(sizes)}",
                                         "--xla_cpu_multi_thread_eigen=false"])
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", *argv, WORKER_FLAG], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"device worker failed:\n{proc.stderr[-3000:]}")
    secs = json.loads(proc.stdout.strip().splitlines()[-1])["secs"]
    tasks = int(args.tasks.split(",")[0])
    step, rest, carry = step_setup(args.arch, tasks, args.classes, args.batch_size)
    plain = common.interleaved({"plain": runner(step, rest, carry)}, rounds=args.rounds, calls=args.steps)["plain"]
    one = secs[str(sizes[0])]
    rows = [{"mesh": f"{n} device(s)", "s/step": f"{secs[str(n)]:.4f}",
             "images/s": f"{args.batch_size / secs[str(n)]:.0f}", "per device": f"{args.batch_size // n}",
             f"vs {sizes[0]} device(s)": f"{one / secs[str(n)]:.2f}x"} for n in sizes]
    rows.append({"mesh": "plain step, 1 device, threaded", "s/step": f"{plain:.4f}",
                 "images/s": f"{args.batch_size / plain:.0f}", "per device": str(args.batch_size),
                 f"vs {sizes[0]} device(s)": f"{one / plain:.2f}x"})
    return rows


# ----------------------------------------------------------------------------- processes (child processes)


def processes_worker(args) -> int:
    """In each child process: join the others (if any), time the data-parallel step fed through ``shard_batch``.

    Prints one JSON line: this process's index, the process and device counts, its median seconds per step and
    the bytes of input it handed to JAX per step (its own rows of the global batch).
    """
    from modkd_jax import parallel  # imported here: after XLA_FLAGS took effect

    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        parallel.maybe_initialize_distributed(True)  # reads JAX_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID
    tasks = int(args.tasks.split(",")[0])
    step, (batch, *others), carry = step_setup(args.arch, tasks, args.classes, args.batch_size)
    host = jax.tree.map(np.asarray, batch)  # the global batch in host memory, the same in every process
    mesh = parallel.make_mesh(data=jax.device_count())
    sharded = parallel.data_parallel(step, mesh)
    placed = tuple(parallel.replicate(mesh, tuple(others)))
    state = {"carry": parallel.replicate(mesh, carry), "fed": 0}

    def run():  # input feeding is part of the step: host rows -> this process's devices, every step
        fed = parallel.shard_batch(mesh, host)
        state["fed"] = sum(s.data.nbytes for leaf in jax.tree.leaves(fed) for s in leaf.addressable_shards)
        state["carry"], m = sharded(state["carry"], fed, *placed)
        return m["loss"]

    secs = common.interleaved({"step": run}, rounds=args.rounds, calls=args.steps)["step"]
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.local_device_count(), "secs": secs, "fed": state["fed"]}), flush=True)
    return 0


def run_layout(processes: int, devices: int, argv: list[str], timeout: float = 1800) -> list[dict]:
    """Start ``processes`` children of ``devices`` single-threaded CPU devices each; their JSON lines, by index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROC"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}",
                                         "--xla_cpu_multi_thread_eigen=false"])
    env["JAX_PLATFORMS"] = "cpu"
    port = common.free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.scaling", *argv, PROCESSES_FLAG], text=True,
                              env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(processes)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:  # only ours, and only if still running (a timeout or a failed peer)
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [err for p, (_, err) in zip(procs, outs) if p.returncode]
    if failed:
        raise RuntimeError(f"process worker failed ({processes} x {devices}):\n{failed[0][-3000:]}")
    return sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda r: r["process"])


def process_rows(args, argv: list[str]) -> list[dict]:
    """One row per layout of ``LAYOUTS``: process 0's median step time, each process's input bytes per step."""
    rows, base = [], None
    for processes, devices in LAYOUTS:
        reports = run_layout(processes, devices, argv)
        secs = reports[0]["secs"]
        base = base or secs
        fed = sorted({r["fed"] for r in reports})
        rows.append({"processes": processes, "devices per process": devices, "ms/step": f"{1000 * secs:.1f}",
                     "input bytes per process per step": " / ".join(f"{b:,}" for b in fed),
                     "time vs 1 process": f"{secs / base:.2f}x"})
    return rows


def estimate_lines() -> list[str]:
    """The input bandwidth per host of a pod, from arithmetic: global batch x bytes per image x steps/s / hosts."""
    lines = [f"estimate, not a measurement: input bytes per host per second = global batch ({ESTIMATE_BATCH}) x bytes "
             f"per image x steps/s (assumed) / hosts; {' or '.join(map(str, ESTIMATE_HOSTS))} hosts "
             f"(v4-32 / v4-64 style pods, 4 chips per host); MB = 10^6 B"]
    rows = [{"dataset": name, "per image": form, "bytes/image": f"{size:,}", "steps/s": f"{rate:g}",
             "images/s": f"{ESTIMATE_BATCH * rate:,.0f}",
             **{f"MB/s per host, {h} hosts": f"{ESTIMATE_BATCH * size * rate / h / 1e6:,.0f}" for h in ESTIMATE_HOSTS}}
            for name, form, size, rate in ESTIMATE]
    return lines + [common.table(rows, list(rows[0]))]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    worker, processes_child = WORKER_FLAG in argv, PROCESSES_FLAG in argv
    argv = [a for a in argv if a not in (WORKER_FLAG, PROCESSES_FLAG)]
    args = parser().parse_args(argv)
    try:
        tasks = [int(t) for t in args.tasks.split(",") if t]
        sizes = [int(n) for n in args.devices.split(",") if n]
    except ValueError:
        tasks, sizes = [], []
    skip = {s for s in args.skip.split(",") if s}
    splits = sizes + ([] if "processes" in skip else [2])  # the processes part splits the batch over 2 devices
    if (not tasks or not sizes or min(tasks + sizes) < 1 or min(args.classes, args.rounds, args.steps) < 1
            or any(args.batch_size % n for n in splits) or skip - {"memory", "steps", "devices", "processes"}):
        print("error: need positive --tasks and --devices, a --batch_size divisible by every mesh size (and 2), "
              "--skip among memory, steps, devices, processes", file=sys.stderr)
        return 2
    if worker:
        return devices_worker(args)
    if processes_child:
        return processes_worker(args)
    print(common.banner())
    print(f"{args.arch}, {args.classes} classes per task, batch {args.batch_size}; {args.rounds} rounds x "
          f"{args.steps} steps, medians; shared machine: compare ratios within a table")
    if "memory" not in skip:
        print("\n1. owner maps vs. task count (int16 per parameter; one stored mask per task for comparison)")
        rows = [memory_row(args.arch, t, args.classes) for t in tasks]
        print(common.table(rows, list(rows[0])))
    if "steps" not in skip:
        print(f"\n2. gated train step of the last task vs. task count (batch {args.batch_size})")
        rows = step_rows(args, tasks)
        print(common.table(rows, list(rows[0])), flush=True)
    if "devices" not in skip:
        print(f"\n3. data-parallel step vs. simulated CPU devices ({tasks[0]} tasks, global batch {args.batch_size}); "
              f"{os.cpu_count()} cores shared by every simulated device: overhead, not speed-up")
        rows = device_rows(args, argv)
        print(common.table(rows, list(rows[0])), flush=True)
    if "processes" not in skip:
        print(f"\n4. data-parallel step on 2 CPU devices: 1 process vs 2 processes on localhost (gloo); {tasks[0]} "
              f"tasks, global batch {args.batch_size} fed through shard_batch every step; {common.load()}; both "
              f"layouts share the same {os.cpu_count()} cores: the ratio is overhead, not speed-up")
        rows = process_rows(args, argv)
        print(common.table(rows, list(rows[0])))
        print("\n" + "\n".join(estimate_lines()))
    print(f"after timing: {common.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
