"""The one task loop: learn, evaluate, log, checkpoint, resume and report, for every Learner.

With a ``workdir`` the run directory is the run: config.json, metrics.jsonl,
results.json, accuracy heatmaps and one orbax checkpoint step per finished task
(state, accuracy matrices, key; re-running resumes after the last finished
task). With ``workdir=None`` it runs in memory (benchmarks, tests). The same
seed gives the same matrices either way.

Several processes (multi-host, ``parallel.maybe_initialize_distributed``): every
process runs the same loop; process 0 alone writes the run directory's files,
every process takes part in each orbax save and restore (the state placed on
``learner.mesh``, see ``checkpoint``), and all resume after process 0's last
finished task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from modkd_jax import checkpoint, diagnostics, metrics, parallel, rundir
from modkd_jax.learner import Learner

SCHEMA = 2  # version of results.json's layout


def _blank(learner: Learner, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NaN matrices ``(*lead, T, T)`` for every rule ``evaluate`` returns."""
    T = learner.task_count
    return {rule: np.full((*np.shape(row)[:-1], T, T), np.nan) for rule, row in rows.items()}


def _per_lead(R: np.ndarray, fn: Callable):
    """``fn`` of each ``(T, T)`` matrix of ``R`` (a nested list over the leading axes)."""
    return fn(R) if R.ndim == 2 else [_per_lead(r, fn) for r in R]


def _fmt(values, unit: str = "%") -> str:
    """Accuracies (one, or one per leading index) as percentages; NaN as "-"."""
    vals = np.atleast_1d(np.asarray(values, float))
    return " ".join("-" if not np.isfinite(v) else f"{100 * v:.2f}{unit}" for v in vals)


def checkpoint_mesh(learner: Learner):
    """Where multi-host checkpoints place the state: ``learner.mesh``, else every device; None with one process."""
    if jax.process_count() == 1:
        return None
    return learner.mesh if learner.mesh is not None else parallel.make_mesh()


def open_run_dir(workdir: str | Path, cfg: dict) -> Path:
    """``rundir.open_run`` in process 0; with several processes the others wait for it and share its verdict.

    A refused run directory (another config, not empty) ends every process with
    a ``RunDirError``, not only process 0 (the others would wait for it forever).

    Args:
      workdir: the run directory (``rundir.open_run`` creates it or checks its config).
      cfg: every setting of the run, saved as config.json or compared with the one there.

    Returns:
      ``workdir`` as a ``Path``, in every process.
    """
    if jax.process_count() == 1:
        return rundir.open_run(workdir, cfg)
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            workdir = rundir.open_run(workdir, cfg)
        except rundir.RunDirError as exc:
            error = exc
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))  # also a barrier: the folder exists
    if error is not None:
        raise error
    if not ok:
        raise rundir.RunDirError(f"process 0 refused the run directory {workdir} (its error line says why)")
    return Path(workdir)


def run(learner: Learner, cfg: dict, workdir: str | Path | None, *, progress: bool = False,
        stop_after: int | None = None, checkpoints: bool = True, echo: Callable[[str], None] | None = print,
        title: str | None = None) -> dict:
    """Run (or resume) ``learner`` through its tasks; returns the results dict (also results.json).

    Args:
      learner: the method (``modkd_jax.learner.Learner``).
      cfg: every setting of the run, with a ``seed``; saved as config.json, checked on resume.
      workdir: the run directory, or None to run in memory.
      progress: show progress bars.
      stop_after: end after this many finished tasks (a clean stop; re-running resumes).
      checkpoints: keep one orbax checkpoint per finished task (with a workdir).
      echo: where the per-task lines and the final table go (None: nowhere).
      title: heading of the accuracy plot.
    """
    echo = echo or (lambda _: None)
    T = learner.task_count
    init_key, task_key = jax.random.split(jax.random.key(cfg["seed"]))
    state = learner.init_state(init_key)
    R: dict[str, np.ndarray] | None = None
    start, seconds, infos = 0, [], []
    log, mngr = None, None
    writer = jax.process_index() == 0  # several processes: one writes the run directory's files
    if workdir is not None:
        workdir = open_run_dir(workdir, cfg)
        if checkpoints:
            mngr = checkpoint.manager(workdir)
            restored = checkpoint.latest(mngr, {"state": state, "rng": checkpoint.key_to_array(task_key)},
                                         mesh=checkpoint_mesh(learner))
            if restored is not None:  # the matrices travel in the step's JSON item (NaN as null)
                _, ckpt, meta = restored
                state, task_key = ckpt["state"], checkpoint.array_to_key(ckpt["rng"])
                R = {k: np.asarray(v, float) for k, v in meta["R"].items()}
                start, seconds, infos = meta["next_task"], meta["seconds"], meta["infos"]
                echo(f"resuming {workdir} after task {start - 1}")
        if writer:
            rundir.truncate_metrics(workdir, start)
            log = lambda rec: rundir.log_metrics(workdir, rec)  # noqa: E731
    for t in range(start, T if stop_after is None else min(T, stop_after)):
        t0, compiles = time.perf_counter(), diagnostics.backend_compiles()
        state, info = learner.learn_task(state, t, jax.random.fold_in(task_key, t), log=log, progress=progress)
        rows = learner.evaluate(state, t + 1)
        if R is None:
            R = _blank(learner, rows)
        for rule, row in rows.items():
            R[rule][..., t, :] = row
        info["seconds"] = time.perf_counter() - t0
        info["compiles"] = diagnostics.backend_compiles() - compiles  # 0 after the first task: nothing recompiles
        info = json.loads(json.dumps(rundir.jsonable(info)))  # as a resumed run reads it back (NaN: null)
        seconds.append(info["seconds"])
        infos.append(info)
        averages = {rule: _per_lead(R[rule], lambda m: metrics.average_accuracy(m, t)) for rule in learner.rules}
        if log is not None:
            log({"task": t, "phase": "summary", **info, **{f"{r}_avg": v for r, v in averages.items()},
                 **{f"{r}_row": R[r][..., t, :] for r in learner.rules}})
        heads = "  ".join(f"{r.upper()} {_fmt(averages[r])}" for r in learner.rules[:2])
        extra = f"  {learner.describe(info)}" if learner.describe is not None else ""
        echo(f"task {t + 1}/{T} {learner.tasks[t]}: {heads}{extra}  {info['seconds']:.1f}s")
        if mngr is not None:
            checkpoint.save(mngr, t + 1, {"state": state, "rng": checkpoint.key_to_array(task_key)},
                            rundir.jsonable({"next_task": t + 1, "seconds": seconds, "infos": infos, "R": R}),
                            mesh=checkpoint_mesh(learner))
    if R is None:  # nothing learnt yet (stop_after=0): empty matrices
        R = _blank(learner, learner.evaluate(state, 1))
    results = make_results(learner, cfg, R, seconds, infos, state)
    if workdir is not None and writer:
        rundir.write_json(workdir / "results.json", results)
        mats = {}
        for rule in learner.rules:
            for idx in np.ndindex(*R[rule].shape[:-2]):
                suffix = "".join(f" {ax} {i}" for ax, i in zip(learner.lead_axes, idx))
                mats[f"{rule.upper()}{suffix} R[i,j]"] = R[rule][idx]
        rundir.plot_matrices(workdir / "accuracy_matrices.png", mats, title=title or learner.name)
    if len(seconds) == T:
        echo(final_table(results))
    if mngr is not None:
        mngr.close()
    return results


def make_results(learner: Learner, cfg: dict, R: dict, seconds: list, infos: list, state) -> dict:
    """results.json: one layout for every method (``SCHEMA``).

    Args:
      learner: the method that ran.
      cfg: every setting of the run.
      R: ``{rule: accuracy matrix}``, each ``[*lead, T, T]`` (NaN for tasks not reached yet).
      seconds: the wall time of each finished task.
      infos: the per-task info dicts of ``learner.learn_task`` (JSON-ready).
      state: the learner's state, for its parameter counts and ``learner.report``.
    """
    done = len(seconds)
    results = {
        "schema": SCHEMA, "method": learner.name, "config": cfg, "tasks": list(learner.tasks),
        "classes": [list(c) for c in learner.classes], "tasks_done": done, "rules": list(learner.rules),
        "lead_axes": list(learner.lead_axes), "accuracy_matrix": R,
        "final": {rule: _per_lead(R[rule], lambda m: metrics.average_accuracy(m, done - 1) if done else None)
                  for rule in R},
        "summary": {rule: _per_lead(R[rule], lambda m: metrics.summarize(m[:done, :done]) if done else {})
                    for rule in R},
        "seconds_per_task": seconds, "task_infos": infos, "params": learner.param_counts(state),
    }
    if learner.report is not None:
        results.update(learner.report(state, infos))
    return results


def final_table(results: dict) -> str:
    """The end-of-run table: each headline rule's average accuracy after every task, forgetting, seconds."""
    rules = tuple(results["rules"])
    R = {rule: np.asarray(results["accuracy_matrix"][rule], float) for rule in rules}
    done = len(results["seconds_per_task"])
    cell = lambda r, t: _fmt(_per_lead(R[r], lambda m: metrics.average_accuracy(m, t)), unit="")  # noqa: E731
    heads = {r: r.upper().replace("_", " ") + " avg" for r in rules}
    width = {r: max(len(heads[r]), len(cell(r, 0))) for r in rules}
    lines = ["", "after task | " + " | ".join(heads[r].rjust(width[r]) for r in rules) + " | seconds",
             "-----------|" + "|".join("-" * (width[r] + 2) for r in rules) + "|--------"]
    for t, sec in enumerate(results["seconds_per_task"]):
        lines.append(f"{t + 1:>10} | " + " | ".join(cell(r, t).rjust(width[r]) for r in rules) + f" | {sec:.1f}")
    parts = [f"{r.upper()} {_fmt(results['final'][r])} "
             f"(forgetting {_fmt(_per_lead(R[r][..., :done, :done], metrics.forgetting), unit='')})"
             for r in rules[:2]]
    lines.append("final: " + ", ".join(parts))
    return "\n".join(lines)
