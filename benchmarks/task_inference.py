"""Task inference, rule x benchmark: class-incremental accuracy, task identified, bytes per task, evaluation time.

    python -m benchmarks.task_inference                    # 3 seeds of MIND's CLI defaults on 3 benchmarks
    python -m benchmarks.task_inference --seeds 1 --benchmarks split_mnist
    python -m benchmarks.task_inference --sweep           # the Gaussian settings on validation data

``--sweep`` fits ``gauss_input`` statistics of the pixels alone (no network)
for several (components, rank, shrinkage) settings on each benchmark's
training splits and reports the share of *validation* inputs whose task they
identify: how the defaults were chosen (never on test data).

Each (benchmark, seed) is the CLI run ``python -m experiments.mind`` with its
defaults (full data, 5 + 5 epochs, ``--task_inference auto``) in
``<root>/<benchmark>_s<seed>``: a finished run directory is only read, an
unfinished one resumes. Per rule the table gives the final class-incremental
accuracy and the share of test inputs whose task the rule identifies (mean ±
std over seeds), the bytes of statistics it stores per task, and its
evaluation time per example relative to ``max_prob``: the final state of seed
0 restored from its checkpoint, every rule on its own in the sub-network
evaluator (every sub-network's outputs computed from scratch, nothing kept), on
4096 test inputs, timed round-robin (``common.interleaved``).
The last row is the rule ``auto`` chose (on validation data) after the last task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = {  # name: CLI flags of experiments.mind
    "split_mnist": ["--dataset", "mnist", "--task_count", "5"],
    "split_fashion_mnist": ["--dataset", "fashion_mnist", "--task_count", "5"],
    "permuted_mnist": ["--dataset", "mnist", "--scenario", "permuted", "--task_count", "10"],
}
TITLES = {"split_mnist": "Split MNIST", "split_fashion_mnist": "Split Fashion-MNIST",
          "permuted_mnist": "Permuted MNIST (10 tasks)"}


def run_dir(root: Path, bench: str, seed: int, data_root: Path) -> Path:
    """Run (or resume, or only read) one CLI run; returns its directory."""
    from experiments import mind as cli

    workdir = root / f"{bench}_s{seed}"
    dataset = BENCHMARKS[bench][1]
    args = BENCHMARKS[bench] + ["--report_rules", "all", "--seed", str(seed), "--data_dir", str(data_root / dataset),
                                "--workdir", str(workdir)]
    if cli.main(args) != 0:
        raise SystemExit(f"experiments.mind {' '.join(args)} failed")
    return workdir


def final(R) -> float:
    """Average accuracy over all tasks after the last one."""
    return float(np.nanmean(np.asarray(R, float)[-1]))


def rule_times(workdir: Path, data_root: Path, rounds: int) -> dict[str, float]:
    """Seconds per test example of every rule alone in the one-pass evaluator, on the run's final state."""
    import jax
    import jax.numpy as jnp

    from benchmarks import common
    from experiments import mind as cli
    from experiments.common import build_scenario
    from modkd_jax import checkpoint, evaluation, task_inference
    from modkd_jax.data.scenarios import Split
    from modkd_jax.methods import mind
    from modkd_jax.subnet_eval import SubnetEvaluator

    cfg = json.loads((workdir / "config.json").read_text())
    mcfg = cli.mind_config(cfg)
    scenario = build_scenario(cfg, str(data_root / cfg["dataset"]))
    m = mind.setup(mcfg, scenario)
    like = {"state": mind.init_state(m, jax.random.key(0)), "rng": checkpoint.key_to_array(jax.random.key(0))}
    mngr = checkpoint.manager(workdir)
    _, ckpt, _ = checkpoint.latest(mngr, like)
    mngr.close()
    state = ckpt["state"]
    T = scenario.task_count
    x = np.concatenate([t.test.x for t in scenario.tasks])[:4096]
    placed = evaluation.place([Split(x, np.zeros(len(x), np.int32), np.zeros(len(x), np.int32))], 512)
    inference = {**state["inference"], "rule": jnp.int32(0)}
    args = (state["params"], state["batch_stats"], state["owner"], inference)
    contenders = {}
    for rule in task_inference.SUBNET_RULES:
        ev = SubnetEvaluator(m.student.apply, T, m.block_size, *scenario.norm, m.kinds, 512)

        def run(ev=ev, rule=rule):  # every sub-network's outputs for the rule, from scratch (nothing kept)
            ev.forget()
            return ev.counts(args, placed, T, rules=(rule,), tau=float(state["tau"]))

        contenders[rule] = run
    seconds = common.interleaved(contenders, rounds=rounds)
    return {rule: s / len(x) for rule, s in seconds.items()}


def table(bench: str, dirs: list[Path], times: dict[str, float]) -> str:
    """Markdown rows of one benchmark: every rule over the seeds, then the rule auto chose."""
    res = [json.loads((d / "results.json").read_text()) for d in dirs]
    rules = res[0]["task_inference"]["rules"]
    lines = [f"**{TITLES[bench]}** ({len(res)} seed{'s' if len(res) > 1 else ''}; TIL {_ms([final(r['accuracy_matrix']['til']) for r in res])})",
             "", "| rule | CIL % | task identified % | bytes stored per task | eval time / max_prob |",
             "|---|---|---|---|---|"]
    for rule in rules:
        cil = _ms([final(r["accuracy_matrix"][f"cil_{rule}"]) for r in res])
        tid = _ms([final(r["accuracy_matrix"][f"task_id_{rule}"]) for r in res])
        size = res[0]["task_inference"]["bytes_per_task"][rule]
        rel = f"{times[rule] / times['max_prob']:.2f}" if times else "-"
        lines.append(f"| {rule} | {cil} | {tid} | {_bytes(size)} | {rel} |")
    chosen = sorted({r["task_inference"]["rule_in_use"][-1] for r in res})
    cil = _ms([final(r["accuracy_matrix"]["cil"]) for r in res])
    lines.append(f"| **auto** (chose {', '.join(chosen)}) | **{cil}** "
                 f"| {_ms([final(r['accuracy_matrix']['task_id']) for r in res])} | | |")
    return "\n".join(lines)


def _ms(values) -> str:
    """``mean ± std`` in percent (sample std); one value alone has no std."""
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.2f}" if len(v) < 2 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _bytes(n: int) -> str:
    return "0" if n == 0 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


SWEEP = ((1, 0, 0.2), (1, 30, 0.2), (4, 30, 0.2), (20, 30, 0.2), (20, 30, 0.5))


def sweep(bench: str, data_root: Path, settings=SWEEP) -> str:
    """Validation task identification of pixel Gaussians, one row per (components per class, rank, shrinkage)."""
    import jax
    import jax.numpy as jnp

    from modkd_jax import data, gaussians, task_inference

    dataset = BENCHMARKS[bench][1]
    scenario_name = "permuted" if "--scenario" in BENCHMARKS[bench] else "class_split"
    scenario = data.build(scenario_name, data.load(dataset, data_dir=str(data_root / dataset)),
                          int(BENCHMARKS[bench][-1]), seed=0, val_fraction=0.1)
    score = jax.jit(jax.vmap(gaussians.task_log_likelihood, in_axes=(0, None)))
    lines = [f"**{TITLES[bench]}**, seed 0, validation split", "",
             "| Gaussians per class | rank | shrinkage | task identified % | bytes per task |", "|---|---|---|---|---|"]
    for comps, rank, shrink in settings:
        fits = [gaussians.fit(np.asarray(task_inference.pixels(t.train.x)), t.train.y, len(t.classes),
                              shrinkage=shrink, rank=rank, components=comps, key=jax.random.key(j))
                for j, t in enumerate(scenario.tasks)]
        stats = {k: jnp.asarray(np.stack([f[k] for f in fits])) for k in fits[0]}
        right = total = 0
        for j, task in enumerate(scenario.tasks):
            for i in range(0, len(task.val.y), 1000):
                s = score(stats, task_inference.pixels(task.val.x[i:i + 1000]))
                right, total = right + int(jnp.sum(jnp.argmax(s, 0) == j)), total + s.shape[1]
        lines.append(f"| {comps} | {rank or 'full'} | {shrink} | {100 * right / total:.2f} | "
                     f"{_bytes(gaussians.nbytes(fits[0]))} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.task_inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path("runs/task_inference"), help="where the run directories live")
    p.add_argument("--data_root", type=Path, default=Path("../shared/data"))
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (0: no timing)")
    p.add_argument("--sweep", action="store_true", help="Gaussian settings on validation data (no network)")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/task_inference.md (--sweep: task_inference_sweep.md)")
    args = p.parse_args(argv)
    from benchmarks import common

    if args.sweep:
        parts = [f"# Pixel Gaussians, task identified on validation data\n\n{common.banner()}\n"]
        parts += [sweep(bench, args.data_root) for bench in args.benchmarks if bench != "permuted_mnist"]
        out = args.out or Path("benchmarks/results/task_inference_sweep.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n\n".join(parts) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        return 0
    parts = [f"# Task inference, rule x benchmark\n\n{common.banner()}\n"]
    for bench in args.benchmarks:
        dirs = [run_dir(args.root, bench, s, args.data_root) for s in range(args.seeds)]
        times = rule_times(dirs[0], args.data_root, args.rounds) if args.rounds else {}
        parts.append(table(bench, dirs, times))
        print(parts[-1], flush=True)
    out = args.out or Path("benchmarks/results/task_inference.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
