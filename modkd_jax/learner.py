"""The one contract every continual learner of the library follows.

A method is a ``Learner``: pure functions over an explicit state pytree (its
weights, masks, owner maps, batch statistics, routing statistics, exchange
schedule ...). ``modkd_jax.loop.run`` drives any Learner through its task
sequence: learn, evaluate, log, checkpoint, resume, report. What a method keeps
between tasks lives in the state, so a checkpoint of the state resumes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np

PyTree = Any
Log = Callable[[dict], None]


class LearnTask(Protocol):
    def __call__(self, state: PyTree, t: int, key: jax.Array, *, log: Log | None = None,
                 progress: bool = False) -> tuple[PyTree, dict]: ...


@dataclasses.dataclass(frozen=True)
class Learner:
    """A continual learner as the loop sees it.

    Attributes:
      name: the method's name in results.json.
      tasks: the names of the tasks in learning order.
      classes: the global class ids of each task (for results.json).
      rules: the headline accuracy rules (the first two are printed per task).
      init_state: ``key -> state`` before any task.
      learn_task: ``(state, t, key, *, log, progress) -> (state, info)``; ``info`` is JSON-able.
      evaluate: ``(state, seen) -> {rule: accuracies on every task's test split}``; an
        accuracy array has shape ``(*lead, task_count)`` (``lead`` as in ``lead_axes``).
      param_counts: ``state -> {part: parameter count}``.
      lead_axes: names of leading axes of every accuracy row (DKT: ``("agent",)``).
      report: optional ``(state, infos) -> dict`` of method-specific results (FLOPs, bytes sent ...).
      describe: optional ``info -> str``, appended to the per-task line.
      mesh: optional ``jax.sharding.Mesh`` the learner computes on. With several
        processes the loop replicates process-local state leaves over it for the
        multi-host orbax checkpoint (None: a mesh of every device); unused otherwise.
    """

    name: str
    tasks: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    rules: tuple[str, ...]
    init_state: Callable[[jax.Array], PyTree]
    learn_task: LearnTask
    evaluate: Callable[[PyTree, int], dict[str, np.ndarray]]
    param_counts: Callable[[PyTree], dict]
    lead_axes: tuple[str, ...] = ()
    report: Callable[[PyTree, list], dict] | None = None
    describe: Callable[[dict], str] | None = None
    mesh: Any = None

    @property
    def task_count(self) -> int:
        return len(self.tasks)


def scenario_fields(scenario) -> dict:
    """``tasks`` and ``classes`` of a Learner built on one ``Scenario``."""
    return {"tasks": tuple(t.name for t in scenario.tasks),
            "classes": tuple(tuple(int(c) for c in t.classes) for t in scenario.tasks)}
