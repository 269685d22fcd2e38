"""One MIND run laid out two ways: 1 process x 4 CPU devices against 2 processes x 2 devices (gloo), over seeds.

    python -m benchmarks.layouts                 # seeds 0-2, writes benchmarks/results/layouts.txt
    python -m benchmarks.layouts --seeds 0 1     # fewer seeds

Both layouts run the README's digits command with the preset's defaults (Adam) through the CLI,
``python -m experiments.mind --dataset digits --seed S``, each in a run directory of its own under
``--root`` (a finished run is only read). The same global batches reach the same 4-device mesh; what
differs is how the gradient all-reduce adds the 4 devices' partial sums (inside one process, or through
gloo between two), so float32 sums can differ in their last bits. Under SGD that leaves the matrices
bit-identical in the tests; Adam divides every update by the root of its second moment, which amplifies
those last bits for weights whose gradients are tiny, and the runs drift apart the way two seeds do. The
table sets the gap between the layouts beside the spread between seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import common

RESULTS = Path(__file__).with_name("results") / "layouts.txt"
ARGS = ["--dataset", "digits"]


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run(root: Path, seed: int, processes: int) -> dict:
    """results.json of the digits run on ``processes`` x ``4 // processes`` devices (run unless finished)."""
    workdir = root / f"{processes}x{4 // processes}_s{seed}"
    if not (workdir / "results.json").exists():
        cmd = [sys.executable, "-m", "experiments.mind", *ARGS, "--seed", str(seed), "--workdir", str(workdir)]
        if processes == 1:
            subprocess.run(cmd, env=_env(4), check=True, capture_output=True)
        else:
            port = common.free_port()
            procs = [subprocess.Popen(cmd + ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                             "--process_id", str(i)], env=_env(2), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True) for i in range(2)]
            for p in procs:
                _, err = p.communicate()
                if p.returncode:
                    raise SystemExit(f"2-process run of seed {seed} failed: {err[-2000:]}")
    return json.loads((workdir / "results.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=Path("runs/layouts"))
    args = ap.parse_args(argv)
    rows, final = [], {1: {"til": [], "cil": []}, 2: {"til": [], "cil": []}}
    for seed in args.seeds:
        res = {p: run(args.root, seed, p) for p in (1, 2)}
        for p, r in res.items():
            for rule in ("til", "cil"):
                final[p][rule].append(100 * r["final"][rule])
        rows.append({"seed": seed, **{f"{rule.upper()} {p}x{4 // p}": f"{final[p][rule][-1]:.2f}"
                                      for rule in ("til", "cil") for p in (1, 2)},
                     "|CIL gap|": f"{abs(final[1]['cil'][-1] - final[2]['cil'][-1]):.2f}"})
    std = {p: {rule: np.std(v, ddof=1) if len(v) > 1 else float("nan") for rule, v in final[p].items()} for p in (1, 2)}
    gaps = {rule: np.abs(np.subtract(final[1][rule], final[2][rule])) for rule in ("til", "cil")}
    lines = [f"$ python -m benchmarks.layouts --seeds {' '.join(map(str, args.seeds))}", common.banner(),
             f"MIND on digits (the preset: Adam, 5 tasks, MLP 128-128, 30 + 30 epochs), final average accuracy %, "
             f"1 process x 4 CPU devices vs 2 processes x 2 (gloo)",
             common.table(rows, list(rows[0])),
             f"gap between the layouts (mean over seeds): TIL {gaps['til'].mean():.2f}, CIL {gaps['cil'].mean():.2f}; "
             f"spread between seeds (sample std): 1x4 TIL {std[1]['til']:.2f} CIL {std[1]['cil']:.2f}, "
             f"2x2 TIL {std[2]['til']:.2f} CIL {std[2]['cil']:.2f}", common.load(), ""]
    common.publish(lines, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
