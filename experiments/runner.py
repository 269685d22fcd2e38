"""The task loop every continual-learning CLI shares: learn, evaluate, log, checkpoint, resume, report.

A method enters as a ``Learner`` (pure functions over an explicit state). With a
workdir the run directory is the run (config.json, metrics.jsonl,
results.json, accuracy heatmaps, one orbax checkpoint per finished task;
re-running resumes); with ``workdir=None`` the loop runs in memory (the
accuracy benchmark). ``experiments.mind`` and ``experiments.baselines`` are
thin CLIs over this loop, so a method gives the same accuracy matrices from its
CLI and from the benchmark (same seed, same keys).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from modkd_jax import checkpoint, metrics, models, rundir
from modkd_jax.data.scenarios import Scenario
from modkd_jax.methods import baselines, mind

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Learner:
    """A continual learner as the loop sees it."""

    name: str
    rules: tuple[str, ...]  # accuracy rules reported (til, cil[, cil_entropy])
    init_state: Callable[[jax.Array], PyTree]
    learn_task: Callable[..., tuple[PyTree, dict]]  # (state, t, key, log=, progress=) -> (state, info)
    evaluate: Callable[[PyTree, list, int], dict]  # (state, test splits, seen) -> {rule: accuracies}
    param_counts: Callable[[PyTree], dict]


def mind_learner(cfg: mind.MindConfig, scenario: Scenario, mesh=None) -> Learner:
    """MIND (or its self-distillation variant) as a Learner; data-parallel over ``mesh`` if given."""
    m = mind.setup(cfg, scenario, mesh=mesh)
    teacher = models.param_count(models.init(m.teacher, jax.random.key(0), scenario.input_shape)[0])
    return Learner("mind_self_distillation" if cfg.self_distillation else "mind", ("til", "cil", "cil_entropy"),
                   lambda key: mind.init_state(m, key),
                   lambda state, t, key, **kw: mind.learn_task(m, state, t, key, **kw),
                   lambda state, splits, seen: mind.evaluate(m, state, splits, seen),
                   lambda state: {"student": models.param_count(state["params"]), "teacher": teacher})


def baseline_learner(cfg: baselines.BaselineConfig, scenario: Scenario) -> Learner:
    """A baseline (fine-tuning, joint, PackNet, LwF, EWC) as a Learner."""
    b = baselines.setup(cfg, scenario)
    return Learner(cfg.method, b.rules, lambda key: baselines.init_state(b, key),
                   lambda state, t, key, **kw: baselines.learn_task(b, state, t, key, **kw),
                   lambda state, splits, seen: baselines.evaluate(b, state, splits, seen),
                   lambda state: {"model": models.param_count(state["params"])})


def run(learner: Learner, scenario: Scenario, cfg: dict, workdir: str | Path | None, *, progress: bool = False,
        stop_after: int | None = None, checkpoints: bool = True, echo: Callable[[str], None] | None = print,
        title: str | None = None) -> dict:
    """Run (or resume) ``learner`` on ``scenario``; returns the results dict (written to results.json).

    ``cfg`` (with a ``seed``) is saved as config.json; ``stop_after`` ends after
    that many finished tasks (to test resuming); ``checkpoints=False`` keeps the
    run directory's files but no per-task checkpoints.
    """
    echo = echo or (lambda _: None)
    T = scenario.task_count
    key = jax.random.key(cfg["seed"])
    init_key, task_key = jax.random.split(key)
    state = learner.init_state(init_key)
    R = {rule: np.full((T, T), np.nan) for rule in learner.rules + ("task_id",)}
    start, seconds, infos = 0, [], []
    log, mngr = None, None
    if workdir is not None:
        workdir = rundir.open_run(workdir, cfg)
        if checkpoints:
            mngr = checkpoint.manager(workdir)
            like = {"state": state, "R": R, "rng": checkpoint.key_to_array(task_key)}
            restored = checkpoint.latest(mngr, like)
            if restored is not None:
                _, ckpt, meta = restored
                state, R = ckpt["state"], {k: np.asarray(v) for k, v in ckpt["R"].items()}
                task_key = checkpoint.array_to_key(ckpt["rng"])
                start, seconds, infos = meta["next_task"], meta["seconds"], meta["infos"]
                echo(f"resuming {workdir} after task {start - 1}")
        rundir.truncate_metrics(workdir, start)
        log = lambda rec: rundir.log_metrics(workdir, rec)  # noqa: E731
    tests = [task.test for task in scenario.tasks]
    for t in range(start, T if stop_after is None else min(T, stop_after)):
        t0 = time.perf_counter()
        state, info = learner.learn_task(state, t, jax.random.fold_in(task_key, t), log=log, progress=progress)
        accs = learner.evaluate(state, tests, t + 1)
        for rule in R:
            R[rule][t] = accs[rule]
        info["seconds"] = time.perf_counter() - t0
        seconds.append(info["seconds"])
        infos.append(info)
        summary = {"task": t, "phase": "summary", **info,
                   **{f"{rule}_avg": metrics.average_accuracy(R[rule], t) for rule in learner.rules},
                   **{f"{rule}_row": R[rule][t] for rule in learner.rules}}
        if log is not None:
            log(summary)
        extra = f"  capacity left {100 * info['capacity_left']:.1f}%" if "capacity_left" in info else ""
        extra += f"  tau {info['tau']:g}" if "tau" in info else ""
        echo(f"task {t + 1}/{T} {scenario.tasks[t].name}: TIL {100 * summary['til_avg']:.2f}%  "
             f"CIL {100 * summary['cil_avg']:.2f}%{extra}  {info['seconds']:.1f}s")
        if mngr is not None:
            checkpoint.save(mngr, t + 1, {"state": state, "R": R, "rng": checkpoint.key_to_array(task_key)},
                            rundir._jsonable({"next_task": t + 1, "seconds": seconds, "infos": infos}))
    done = len(seconds)
    results = {
        "method": learner.name, "config": cfg, "tasks": [task.name for task in scenario.tasks], "tasks_done": done,
        "classes": [task.classes for task in scenario.tasks],
        "accuracy_matrix": {rule: R[rule] for rule in learner.rules}, "task_id_matrix": R["task_id"],
        "summary": {rule: metrics.summarize(R[rule][:done, :done]) if done else {} for rule in learner.rules},
        "seconds_per_task": seconds, "task_infos": infos, "params": learner.param_counts(state),
    }
    if any("tau" in info for info in infos):  # the inference temperature in use after each task
        results["inference_temperature"] = [info.get("tau") for info in infos]
    if workdir is not None:
        rundir.write_json(workdir / "results.json", results)
        rundir.plot_matrices(workdir / "accuracy_matrices.png",
                             {f"{rule.upper()} R[i,j]": R[rule] for rule in learner.rules},
                             title=title or f"{learner.name} on {scenario.name}")
    if done == T:
        echo(final_table(results))
    if mngr is not None:
        mngr.close()
    return results


def final_table(results: dict) -> str:
    """The end-of-run table: average accuracy per rule after each task, final forgetting, seconds."""
    rules = tuple(results["accuracy_matrix"])
    R = {rule: np.asarray(results["accuracy_matrix"][rule], float) for rule in rules}
    heads = {"til": "TIL avg", "cil": "CIL avg", "cil_entropy": "CIL (entropy) avg"}
    lines = ["", "after task | " + " | ".join(heads[r] for r in rules) + " | seconds",
             "-----------|" + "|".join("-" * (len(heads[r]) + 2) for r in rules) + "|--------"]
    for t, sec in enumerate(results["seconds_per_task"]):
        lines.append(f"{t + 1:>10} | " + " | ".join(
            f"{100 * metrics.average_accuracy(R[r], t):>{len(heads[r])}.2f}" for r in rules) + f" | {sec:.1f}")
    s = results["summary"]
    lines.append(f"final: TIL {100 * s['til']['average_accuracy']:.2f}% (forgetting {100 * s['til']['forgetting']:.2f}), "
                 f"CIL {100 * s['cil']['average_accuracy']:.2f}% (forgetting {100 * s['cil']['forgetting']:.2f})")
    return "\n".join(lines)
