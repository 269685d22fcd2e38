"""What several methods share: the network of a config, the data-axis batch check, input normalisation, the class
block size, the class-block loss and its context, one tagged training phase, sub-network task inference.

One place for them, so that no method module imports another method module for its helpers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from modkd_jax import evaluation, losses, masks, models, task_inference, training
from modkd_jax.data.scenarios import Scenario

PyTree = Any


def build(cfg, num_outputs: int, num_tasks: int):
    """The network ``cfg.arch`` (an MLP of widths ``cfg.hidden``) with ``num_outputs`` outputs and ``num_tasks`` rows
    of per-task batch norm (``models.build``).

    Args:
      cfg: a method config with ``arch`` and ``hidden`` (``hidden`` read for ``"mlp"`` only).
      num_outputs: the classifier's outputs (every task's class block).
      num_tasks: the rows of per-task batch norm.
    """
    kwargs = {"hidden": tuple(cfg.hidden)} if cfg.arch == "mlp" else {}
    return models.build(cfg.arch, num_outputs, num_tasks, **kwargs)


def check_batch_split(batch_size: int, mesh: Mesh | None) -> None:
    """A ValueError unless ``batch_size`` splits evenly over the ``data`` axis of ``mesh`` (no mesh: no check).

    Args:
      batch_size: the training batch.
      mesh: the data-parallel mesh, or None.
    """
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {batch_size} does not split over {mesh.shape['data']} devices; "
                         f"use a multiple of {mesh.shape['data']}")


def norm_of(scenario: Scenario, dtype=None) -> tuple:
    """``(mean, std)`` of the scenario's input standardisation: tuples of floats, or float arrays of ``dtype``.

    Args:
      scenario: the scenario (its ``norm``).
      dtype: the arrays' dtype; None: tuples of Python floats.
    """
    mean, std = (tuple(float(v) for v in a) for a in scenario.norm)
    if dtype is None:
        return mean, std
    return jnp.asarray(mean, dtype), jnp.asarray(std, dtype)


def block_size_of(scenario: Scenario) -> int:
    """The common class-block size; MIND's one compiled step needs equal blocks."""
    sizes = set(scenario.block_sizes)
    if len(sizes) != 1:
        raise ValueError(f"MIND needs tasks with equally many classes, got block sizes {scenario.block_sizes}")
    return sizes.pop()


class Context(NamedTuple):
    """What one MIND train step needs besides the batch: task id, masks, the frozen teacher."""

    task: jax.Array  # int32 scalar
    forward: PyTree  # weights that compute (bool per weight)
    trainable: PyTree  # weights that are updated (the gate of ``optim.gated``)
    teacher: PyTree = None  # frozen teacher variables (distillation phases)


def make_loss(apply_fn: Callable, block_size: int, kind: str = "ce", beta: float = 0.0,
              temperature: float = 1.0) -> Callable:
    """CE on the task's class block, plus ``beta * losses.distillation(kind, ..., temperature)`` unless ``kind='ce'``.

    Args:
      apply_fn: the model's ``apply(variables, x, task, train=True, mutable=["batch_stats"])``.
      block_size: the classes per task (labels are task-local).
      kind: ``"ce"`` (no distillation) or a ``losses.DISTILL_LOSSES`` kind against ``inputs.teacher``.
      beta: the distillation term's weight.
      temperature: the distillation temperature.

    Returns:
      A ``training.LossFn`` over a ``Context``; its metrics are ``ce``, ``distill`` and ``acc``.
    """

    def loss_fn(params, batch_stats, inputs: training.Inputs, ctx: Context):
        valid = inputs.valid  # a padded batch: only its real rows count, in the loss and the batch statistics
        kwargs = {} if valid is None else {"weights": valid}
        logits, new = apply_fn({"params": masks.gate(params, ctx.forward), "batch_stats": batch_stats},
                               inputs.x, ctx.task, train=True, mutable=["batch_stats"], **kwargs)
        z = training.block(logits, ctx.task, block_size)
        ce = losses.cross_entropy(z, inputs.y, valid)
        extra = jnp.zeros(()) if kind == "ce" else losses.distillation(kind, z, inputs.teacher, temperature, valid)
        acc = losses.batch_mean(jnp.argmax(z, -1) == inputs.y, valid)
        return ce + beta * extra, (new["batch_stats"], {"ce": ce, "distill": extra, "acc": acc})

    return loss_fn


def train_phase(step: Callable, tx, params: PyTree, batch_stats: PyTree, split, ctx, phase: training.Phase,
                key: jax.Array, *, task: int, name: str, log: Callable[[dict], None] | None = None,
                progress: bool = False, desc: str | None = None):
    """One training phase (``training.run_phase``) of task ``task`` from a fresh optimizer state of ``tx``.

    Args:
      step: the train step (``training.make_step`` with ``tx``).
      tx: the optimizer; its state starts afresh from ``params``.
      params: the starting parameters.
      batch_stats: the starting batch statistics.
      split: the task's training split (a ``training.DeviceSplit`` or a host ``Split``).
      ctx: the step's context (a ``Context``).
      phase: epochs, batch size and learning rate.
      key: the phase's PRNG key.
      task: the task, tagged on log records and named in the progress bar.
      name: the phase's name, tagged on log records.
      log: receives the tagged per-epoch records (None: none).
      progress: show a progress bar.
      desc: the progress bar's label (None: ``"task <task> <name>"``).

    Returns:
      The carry ``(params, batch_stats, opt_state)``.
    """
    tagged = None if log is None else (lambda m: log({"task": task, "phase": name, **m}))
    carry = (params, batch_stats, tx.init(params))
    return training.run_phase(step, carry, split, ctx, phase, key,
                              desc=f"task {task} {name}" if desc is None else desc, log=tagged, progress=progress)


def subnet_inference_stats(ti: task_inference.InferenceConfig, model, scenario: Scenario, block_size: int) -> PyTree:
    """Task-inference statistics before any task of an owner map's sub-networks (MIND, PackNet).

    Args:
      ti: the task-inference settings.
      model: the network (``models.feature_dim`` reads its features' width).
      scenario: the tasks (count, input shape).
      block_size: the classes per task.
    """
    return task_inference.init_stats(ti, ti.candidates(task_inference.SUBNET_RULES), scenario.task_count, block_size,
                                     int(np.prod(scenario.input_shape)), models.feature_dim(model, scenario.input_shape),
                                     fitted=ti.fitted(task_inference.SUBNET_RULES))


def subnet_accuracies(subnets, ti: task_inference.InferenceConfig, state: PyTree, splits, seen: int, tau: float,
                      batch_size: int, task_ids=None) -> dict[str, np.ndarray]:
    """Accuracy per rule of an owner map's sub-networks (``SubnetEvaluator``) on ``splits`` of ``task_ids``.

    til; cil and task_id of the rule in use and of every reported rule.

    Args:
      subnets: the method's ``subnet_eval.SubnetEvaluator``.
      ti: the task-inference settings (candidate and reported rules).
      state: the method's state: ``params``, ``batch_stats``, ``owner``, ``inference``.
      splits: a ``Placed`` or a list of ``Split``s (placed here on the evaluator's mesh).
      seen: the number of tasks learnt so far.
      tau: the inference temperature the rules read.
      batch_size: examples per batch (for placing host splits).
      task_ids: the task of each split (default ``0, 1, ...``).
    """
    if not isinstance(splits, evaluation.Placed):
        splits = evaluation.place(splits, batch_size, subnets.mesh)
    return subnets.accuracies((state["params"], state["batch_stats"], state["owner"], state["inference"]),
                              splits, seen, rules=ti.reported(task_inference.SUBNET_RULES),
                              in_use=ti.candidates(task_inference.SUBNET_RULES), tau=tau, task_ids=task_ids)
