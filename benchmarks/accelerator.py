"""One script for a lent GPU/TPU: MIND's ResNet-32 hot paths measured on whatever backend JAX finds.

    python -m benchmarks.accelerator --quick        # CPU: ~3 min on 2 quiet cores -> results/accelerator_cpu.txt
    python -m benchmarks.accelerator [--out PATH]   # GPU/TPU: ~5-8 min -> results/accelerator_<backend>.txt
    python -m benchmarks.accelerator --parts 1,3    # some parts only

On XLA:CPU the ResNet-32 step inside run_phase's compiled epoch loop runs ~20-25x slower than the same step as
its own program (part 2 prints the ratio), which is why parts 2 and 4 take most of the CPU run.

On a GPU machine: ``pip install -e ".[cuda12]"``, then ``python -m benchmarks.accelerator`` (on the lent
device machine, ``--out $OUT/accelerator_gpu.txt`` so the file comes back). Sizes follow
``jax.default_backend()``: accelerators get the real sizes, the CPU (and ``--quick``) fewer steps and examples.
The file starts with the command line and is rewritten after every part, so a run cut short keeps what it
measured; each part runs in its own ``try`` (a failure prints its error line and the next part runs).

1. **MIND ResNet-32 train steps** (``benchmarks.train_step.jax_contenders``: CIFAR-shaped 32x32x3 uint8
   inputs, 10 tasks of 10 classes, batch 256, crop+flip): the teacher step and the distillation step
   (student sub-network 4, CE + 5 x symmetric KL against a frozen teacher). Seconds per step and images/s
   (median of round-robin rounds, ``common.interleaved``), XLA's FLOPs per step, compile seconds (XLA backend
   compile time, summed from JAX's compile events) and backend compiles (``diagnostics.backend_compiles``)
   of the setup (init + lowering and compiling both steps for their cost analysis) and of the first call, and
   backend compiles while timed (0: nothing recompiles).
2. **Host overhead per step of ``training.run_phase``** (``benchmarks.hot_paths.step_overhead`` with
   ``arch="resnet32"``): the same epochs of the gated ResNet-32 step (``scaling.step_setup``, last of 10
   tasks) on a device-resident split run by ``run_phase``, as one compiled call of the same epoch
   programs (the device alone), and by the old host loop; overhead = difference per step.
3. **Class-incremental evaluation over 10 sub-networks** (``benchmarks.inference.measure``): every
   sub-network's probabilities of a batch (512 on accelerators) in one call, ``lax.map`` vs ``vmap``
   (``routing.subnet_probs`` strategies), beside the loop of 10 jitted forwards; seconds per batch,
   images/s, compile seconds, the memory XLA plans per call, and the device's peak memory where reported.
4. **One CIFAR-100-shaped MIND task end to end** through the real code path: ``tfds.testing.mock_data``
   CIFAR-100, ``data.load("cifar100")``, a 10-task class split with 10 % validation, the CIFAR-100 preset
   with ``task_inference="gauss_own_z"`` (the rule meant for natural images) and then ``"auto"``,
   ``loop.run(..., stop_after=1)``: seconds for the task, its backend compiles (``task_infos[0]["compiles"]``)
   and compile seconds, the statistics stored per task, the data sizes and accuracies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from benchmarks import common, inference, train_step
from modkd_jax import diagnostics

RESULTS = Path(__file__).with_name("results")
TASKS, CLASSES, BATCH = 10, 10, 256  # batch of part 1 (64 on CPU with --quick)

# Sizes per (accelerator?, quick?). step: rounds x steps per round, batch; overhead: split rows, batch, epochs;
# eval: batch, rounds; task: mock examples per split (a task gets ~1/10 of them), epochs per phase.
SIZES = {
    (True, False): dict(step=(5, 20, BATCH), overhead=(256 * 40, 256, 2), eval=(512, 5), task=(20_000, 3)),
    (True, True): dict(step=(3, 5, BATCH), overhead=(256 * 10, 256, 1), eval=(512, 3), task=(6_000, 1)),
    (False, False): dict(step=(2, 2, BATCH), overhead=(256, 64, 1), eval=(128, 2), task=(3_000, 1)),
    (False, True): dict(step=(1, 2, 64), overhead=(64, 32, 1), eval=(32, 1), task=(1_000, 1)),
}


class CompileClock:
    """Backend compiles and XLA compile seconds since ``start()`` (JAX's compile events, process-wide)."""

    durations: list[float] = []
    _registered = False

    @classmethod
    def _on_event(cls, event: str, duration: float, **_) -> None:
        if event == diagnostics._EVENT:
            cls.durations.append(duration)

    def __init__(self):
        if not CompileClock._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileClock._on_event)
            CompileClock._registered = True
        self.start()

    def start(self) -> None:
        self.count0, self.at = diagnostics.backend_compiles(), len(CompileClock.durations)

    def read(self, longest: int = 0):
        """(backend compiles, compile seconds[, the ``longest`` longest compiles]) since ``start()``; restarts."""
        new = CompileClock.durations[self.at:]
        out = (diagnostics.backend_compiles() - self.count0, float(sum(new)))
        self.start()
        return out + (sorted(new, reverse=True)[:longest],) if longest else out


def part_train_step(sizes: dict) -> list[str]:
    """1. The teacher and distillation steps of MIND's gated ResNet-32: time, FLOPs, compiles."""
    rounds, steps, batch = sizes["step"]
    rng = np.random.default_rng(0)
    x_u8 = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, CLASSES, (batch,)).astype(np.int32)
    clock = CompileClock()
    t0 = time.perf_counter()
    run_t, run_d, flops_t, flops_d, _ = train_step.jax_contenders("xla", SimpleNamespace(tasks=TASKS, classes=CLASSES),
                                                                  x_u8, y)
    setup_s, (setup_n, setup_c, top) = time.perf_counter() - t0, clock.read(longest=2)
    contenders = {"teacher": run_t, "distill": run_d}
    first = {}
    for name, fn in contenders.items():
        first[name] = (common.time_once(fn), *clock.read())
    secs = common.interleaved(contenders, rounds=rounds, calls=steps, warmup=0)
    timed_n, _ = clock.read()
    flops = {"teacher": flops_t, "distill": flops_d}
    labels = {"teacher": "teacher: CE, 1-task ResNet-32", "distill": "distill: CE + 5 symKL, frozen teacher"}
    rows = [{"step": labels[k], "s/step": f"{s:.4f}", "images/s": f"{batch / s:.0f}",
             "GFLOP/step": "-" if flops[k] is None else f"{flops[k] / 1e9:.1f}",
             "GFLOP/s": "-" if flops[k] is None else f"{flops[k] / s / 1e9:.0f}",
             "first call s": f"{first[k][0]:.2f}", "compiles in first call": first[k][1],
             "compile s in first call": f"{first[k][2]:.2f}"} for k, s in secs.items()]
    return [f"1. MIND ResNet-32 train steps (benchmarks.train_step.jax_contenders, variant xla): batch {batch}, "
            f"{TASKS} tasks x {CLASSES} classes, uint8 32x32x3, crop+flip; {rounds} rounds x {steps} steps, medians",
            common.table(rows, list(rows[0])),
            f"setup (init + lower/compile of both steps for XLA's cost analysis): {setup_s:.1f} s, "
            f"{setup_n} backend compiles, {setup_c:.1f} s of XLA compile, the two longest (the two steps) "
            f"{' and '.join(f'{c:.1f} s' for c in top)}; backend compiles while timed: {timed_n}"]


def part_overhead(sizes: dict) -> list[str]:
    """2. ``run_phase``'s host cost per step beyond the step, on the gated ResNet-32 step."""
    saved = os.environ.get("XLA_FLAGS")
    from benchmarks import hot_paths  # sets XLA_FLAGS for its own runs: JAX has started here, they change nothing
    if saved is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = saved
    n, batch, epochs = sizes["overhead"]
    so = hot_paths.step_overhead(n=n, epochs=epochs, arch="resnet32", batch=batch)
    rows = [{"loop": f"run_phase, one compiled call per {kind}", "ms/step": f"{so[kind + '_ms']:.3f}",
             "images/s": f"{1000 * batch / so[kind + '_ms']:.0f}",
             "beyond the step": f"{so[kind + '_ms'] - so['alone_ms']:.3f}"} for kind in ("epoch", "step")]
    rows += [{"loop": "the step alone (one placed batch)", "ms/step": f"{so['alone_ms']:.3f}",
              "images/s": f"{1000 * batch / so['alone_ms']:.0f}", "beyond the step": "0"},
             {"loop": "the previous host loop", "ms/step": f"{so['host_loop_ms']:.3f}",
              "images/s": f"{1000 * batch / so['host_loop_ms']:.0f}",
              "beyond the step": f"{so['old_overhead_ms']:.3f}"}]
    return [f"2. run_phase cost per step beyond the step (benchmarks.hot_paths.step_overhead, arch resnet32): gated "
            f"ResNet-32 step of task 10 of 10, batch {batch}, {n} rows, {epochs} epoch(s) = {so['steps']} steps per "
            f"contender; median of 3 alternating rounds; loop 'auto' is '{so['auto']}' on this backend",
            common.table(rows, list(rows[0])),
            f"ms/step in the compiled epoch loop / the step alone: {so['epoch_ms'] / so['alone_ms']:.2f} "
            "(above 1: the backend runs the step slower inside a loop body)"]


def part_eval(sizes: dict) -> list[str]:
    """3. Every sub-network's probabilities in one call: ``lax.map`` vs ``vmap``, and the loop of jits."""
    batch, rounds = sizes["eval"]
    args = inference.parser().parse_args(["--batch_size", str(batch), "--rounds", str(rounds), "--no_eager_copy"])
    rows = inference.measure("resnet32", TASKS, args, list(inference.STRATEGIES))
    peak = common.device_peak_memory()
    return [f"3. class-incremental evaluation, ResNet-32, {TASKS} sub-networks (benchmarks.inference.measure): "
            f"batch {batch}; {rounds} rounds, medians",
            common.table(rows, ["contender", "s/batch", "images/s", "loop / this", "compile s", "memory"]),
            f"device peak memory so far: {common.fmt_bytes(peak)}" + (" (not reported on this backend)"
                                                                    if peak is None else "")]


def part_task(sizes: dict) -> list[str]:
    """4. Task 1 of a CIFAR-100-shaped 10-task MIND run on tfds mock data, through ``loop.run``."""
    import tensorflow_datasets as tfds

    from modkd_jax import data, loop
    from modkd_jax.methods import mind
    from modkd_jax.task_inference import InferenceConfig

    examples, epochs = sizes["task"]
    t0 = time.perf_counter()
    with tfds.testing.mock_data(num_examples=examples):
        ds = data.load("cifar100")
    load_s = time.perf_counter() - t0
    sc = data.build("class_split", ds, TASKS, seed=0, val_fraction=0.1)
    first = sc.tasks[0]
    lines = [f"4. one CIFAR-100-shaped MIND task end to end (tfds mock data, {examples} examples per split; "
             f"class_split into {TASKS} tasks, val_fraction 0.1; {epochs} epoch(s) per phase); task 1: "
             f"{len(first.train.y)} train, {len(first.val.y)} validation, {len(first.test.y)} test images; "
             f"mock data loaded in {load_s:.1f} s"]
    rows = []
    for rule in RULES_PART4:  # the rule meant for natural images alone, then auto choosing among all of them
        cfg = mind.preset_config("cifar100", epochs=epochs, distill_epochs=epochs,
                                 inference=InferenceConfig(task_inference=rule))
        clock = CompileClock()
        t0 = time.perf_counter()
        try:
            res = loop.run(mind.learner(cfg, sc), {"seed": 0}, None, echo=None, stop_after=1)
        except Exception as err:  # noqa: BLE001 - one rule failing leaves the other's row
            lines.append(f"task_inference={rule} failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            continue
        wall = time.perf_counter() - t0
        _, compile_s = clock.read()
        info = res["task_infos"][0]
        final = res.get("final", {})
        in_use = res.get("task_inference", {}).get("rule_in_use", ["-"])
        stored = res.get("task_inference", {}).get("bytes_per_task", {})
        rows.append({"task_inference": rule, "rule in use": in_use[0] if in_use else "-",
                     "task s": f"{info['seconds']:.1f}", "loop.run s": f"{wall:.1f}", "compiles": info["compiles"],
                     "compile s": f"{compile_s:.1f}", "stats MB/task": f"{sum(stored.values()) / 1e6:.2f}",
                     "TIL acc": _acc(final.get("til")), "CIL acc": _acc(final.get("cil"))})
    if rows:
        lines.append(common.table(rows, list(rows[0])))
        lines.append("(mock data: random images and labels, train = test examples; accuracies are not meaningful)")
    return lines


def _acc(v) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "-"


RULES_PART4 = ("gauss_own_z", "auto")
PARTS = (("train step", part_train_step), ("run_phase overhead", part_overhead), ("CIL evaluation", part_eval),
         ("one MIND task", part_task))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and examples")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default: benchmarks/results/accelerator_<backend>.txt)")
    ap.add_argument("--parts", default="1,2,3,4", help="comma-separated parts to run (1-4)")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    out = args.out or RESULTS / f"accelerator_{backend}.txt"
    sizes = SIZES[(backend != "cpu", args.quick)]
    lines = [" ".join(["$ python -m benchmarks.accelerator", *argv]), common.banner(),
             f"sizes ({'accelerator' if backend != 'cpu' else 'cpu'}{', quick' if args.quick else ''}): {sizes}"]
    print("\n".join(lines), flush=True)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")

    save()
    failed, t_all = 0, time.perf_counter()
    wanted = {int(p) for p in args.parts.split(",") if p}
    for i, (name, part) in enumerate(PARTS, 1):
        if i not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            new = part(sizes)
        except Exception as err:  # noqa: BLE001 - one part failing leaves the others' output
            failed += 1
            traceback.print_exc()  # stderr: the whole story; the results keep the error line
            new = [f"{i}. {name} FAILED: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"]
        new.append(f"({name}: {time.perf_counter() - t0:.0f} s; {common.load()})")
        print("\n" + "\n".join(new), flush=True)
        lines += [""] + new
        save()
    lines += ["", f"{time.perf_counter() - t_all:.0f} s in all; {failed} part(s) failed; {common.load()}"]
    print(lines[-1], flush=True)
    save()
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
