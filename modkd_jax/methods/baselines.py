"""Baselines for MIND under the same protocol: fine-tuning, joint training, PackNet, LwF and EWC.

Single-head methods (``finetune``, ``joint``, ``lwf``, ``ewc``) train one
network with one batch norm and all tasks' class blocks side by side in one
head. Their cross-entropy runs over the classes of every task seen so far
(``head="seen"``, the class-incremental protocol of van de Ven et al. 2019
behind the published Split MNIST anchors) or only over the task's own block
(``head="task"``). Task-incremental accuracy is the argmax over the true
task's block, class-incremental the argmax over all seen blocks.

- ``finetune``: plain training task after task (the lower bound).
- ``joint``: after task t, continue training on the pooled training data of
  tasks 0..t (cumulative; the upper bound, and a full accuracy matrix).
- ``lwf``: CE + alpha * T^2 KL between the previous model's and the network's
  softmax over the classes of earlier tasks (Li & Hoiem 2016, single head).
- ``ewc``: CE + lambda * 0.5 * sum F (w - w*)^2; F is the diagonal empirical
  Fisher (per-example squared gradients of log p(y|x)) summed over the tasks
  so far and w* the weights after the last task (online EWC with gamma = 1).

``packnet`` (Mallya & Lazebnik 2018) uses MIND's network and owner map: train
the free weights (earlier tasks' weights frozen, in the forward pass), keep
the largest-|w| 1/N share of the layer for the task (``masks.assign`` with the
magnitude policy, so capacity matches MIND's), reset the rest to zero for
later tasks, retrain the kept share; no distillation. Inference per
sub-network, class-incremental by MIND's max-probability rule.

State is an explicit pytree: ``{"params", "batch_stats"}`` plus ``"fisher"``
(EWC) or ``"owner"`` (PackNet); ``learn_task`` maps (state, task) to the next.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from modkd_jax import evaluation, fisher as ewc_fisher, losses, masks, models, parallel, task_inference, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, Split
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.methods.kit import (block_size_of, build, check_batch_split, make_loss, norm_of, subnet_accuracies,
                                   subnet_inference_stats, train_phase)
from modkd_jax.methods.mind import PRESETS, preset_config
from modkd_jax.subnet_eval import SubnetEvaluator

PyTree = Any

METHODS = ("finetune", "joint", "packnet", "lwf", "ewc")
HEADS = ("seen", "task")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Hyperparameters of a baseline run; training flags mean what they mean for MIND's teacher."""

    method: str = "finetune"
    arch: str = "resnet32"
    hidden: tuple[int, ...] = (400, 400)  # MLP widths
    epochs: int = 50  # training epochs per task (PackNet: before pruning)
    retrain_epochs: int = 50  # PackNet: retraining the kept share after pruning
    batch_size: int = 256
    lr: float = 0.005
    lr_milestone: float = 0.7  # lr halved at this fraction of each phase's epochs
    optimizer: str = "adam"
    weight_decay: float = 0.0
    head: str = "seen"  # single-head CE over all seen classes, or over the task's block only
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 1000.0
    ewc_samples: int = 1024  # training examples per task the Fisher is estimated on
    temperature: float = 6.5  # PackNet inference temperature (max-probability rule), MIND's tau
    crop_flip: bool = True
    eval_batch_size: int = 512
    inference: task_inference.InferenceConfig = task_inference.InferenceConfig()  # PackNet's task inference

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected 'seen' or 'task'")
        if min(self.epochs, self.retrain_epochs, self.batch_size, self.ewc_samples) < 1:
            raise ValueError("epochs, retrain_epochs, batch_size and ewc_samples must be at least 1")
        if self.ewc_lambda < 0 or self.lwf_alpha < 0:
            raise ValueError("ewc_lambda and lwf_alpha must be non-negative")


def preset(dataset: str) -> dict:
    """MIND's per-dataset preset as the baselines read it (``epochs`` trains each task, PackNet retrains
    for MIND's distillation epochs); the same protocol, so the comparison is like for like."""
    m = preset_config(dataset)
    return {**{k: getattr(m, k) for k in ("arch", "hidden", "epochs", "batch_size", "lr", "crop_flip")},
            "task_count": PRESETS[dataset]["task_count"], "retrain_epochs": m.distill_epochs, "val_fraction": 0.1}


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Everything static about a baseline run: network, compiled steps and evaluators."""

    cfg: BaselineConfig
    scenario: Scenario
    model: Any
    apply_fn: Callable  # the network's apply; single-head: the task id never selects batch norm
    kinds: PyTree
    block_size: int
    tx: Any
    step: Callable
    counts: Callable
    fisher_fn: Callable | None  # EWC
    block_counts: Callable | None  # PackNet: one sub-network on its own block (validation)
    features: Callable | None  # PackNet: a sub-network's features (task-inference statistics)
    subnets: SubnetEvaluator | None = None  # PackNet: every sub-network (test accuracies, the rule on validation)
    val: evaluation.Placed | None = None  # PackNet: every task's validation split, on the device once

    @property
    def task_count(self) -> int:
        return self.scenario.task_count

    @property
    def rules(self) -> tuple[str, ...]:
        """Accuracy rules this method reports (task-inference rules need sub-networks)."""
        if self.cfg.method == "packnet":  # evaluate also gives cil_<rule> / task_id_<rule> of every rule
            return ("til", "cil", "task_id")
        return ("til", "cil")


# ----------------------------------------------------------------------------------------------
# Loss terms (pure, tested on their own)


def class_window(num_outputs: int, lo, hi) -> jax.Array:
    """Boolean mask of the output classes ``lo <= c < hi`` (bounds may be traced)."""
    c = jnp.arange(num_outputs)
    return (c >= lo) & (c < hi)


def lwf_term(student_logits: jax.Array, teacher_logits: jax.Array, task, block_size: int,
             temperature: float) -> jax.Array:
    """LwF: T^2 KL(old model || network) of the softmax over earlier tasks' classes; 0 on task 0."""
    old = class_window(student_logits.shape[-1], 0, task * block_size)
    kd = losses.kd_kl(losses.masked_logits(student_logits, old), losses.masked_logits(teacher_logits, old),
                      temperature)
    return jnp.where(task > 0, kd, 0.0)


def ewc_penalty(params: PyTree, anchor: PyTree, fisher: PyTree) -> jax.Array:
    """EWC: 0.5 * sum F (w - w*)^2 over every parameter (zero at the anchor)."""
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p - a)), params, anchor, fisher)
    return 0.5 * sum(jax.tree.leaves(terms))


# ----------------------------------------------------------------------------------------------
# Compiled pieces


def _single_head_apply(model) -> Callable:
    """``apply(variables, x, task, ...)`` of a one-batch-norm network: the task id is not used."""

    def apply(variables, x, task=0, train=False, **kwargs):
        return model.apply(variables, x, 0, train=train, **kwargs)

    return apply


class Context(NamedTuple):
    """What one baseline train step needs besides the batch."""

    task: jax.Array  # int32 scalar
    forward: PyTree  # weights that compute
    trainable: PyTree  # weights that are updated
    old: PyTree = None  # LwF: the previous model's variables
    anchor: PyTree = None  # EWC: the weights after the last task
    fisher: PyTree = None  # EWC: the summed diagonal Fisher


def make_head_loss(apply_fn: Callable, cfg: BaselineConfig, block_size: int, *, global_labels: bool = False):
    """The single-head loss: CE over the seen (or the task's) classes, plus LwF's or EWC's term.

    Labels are task-local (``global_labels=False``) or already global class ids
    (joint training on pooled tasks).
    """
    k, method = block_size, cfg.method

    def loss_fn(params, batch_stats, inputs: training.Inputs, ctx: Context):
        task = ctx.task
        labels = inputs.y if global_labels else inputs.y + task * k
        lo = 0 if (cfg.head == "seen" or global_labels) else task * k
        logits, new = apply_fn({"params": masks.gate(params, ctx.forward), "batch_stats": batch_stats}, inputs.x,
                               task, train=True, mutable=["batch_stats"])
        z = losses.masked_logits(logits, class_window(logits.shape[-1], lo, (task + 1) * k))
        ce = losses.cross_entropy(z, labels)
        if method == "lwf":
            reg = cfg.lwf_alpha * lwf_term(logits, inputs.teacher, task, k, cfg.lwf_temperature)
        elif method == "ewc":
            reg = cfg.ewc_lambda * ewc_penalty(params, ctx.anchor, ctx.fisher)
        else:
            reg = jnp.zeros(())
        acc = jnp.mean(jnp.argmax(z, -1) == labels)
        return ce + reg, (new["batch_stats"], {"ce": ce, "reg": reg, "acc": acc})

    return loss_fn


def make_head_counts(apply_fn: Callable, block_size: int, mean, std):
    """``counts(variables, x, y, valid, true_task, seen) -> correct counts`` of a single-head network, jitted.

    til: argmax over the true task's block; cil: argmax over the blocks of the
    first ``seen`` tasks; task_id: that argmax falls in the true task's block.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(variables, x, y, valid, true_task, seen):
        logits = apply_fn(variables, batching.to_float(x, mean, std), true_task, train=False)
        til = jnp.argmax(training.block(logits, true_task, block_size), -1) == y
        cls = jnp.argmax(losses.masked_logits(logits, class_window(logits.shape[-1], 0, seen * block_size)), -1)
        return {"til": jnp.sum(valid & til), "cil": jnp.sum(valid & (cls == true_task * block_size + y)),
                "task_id": jnp.sum(valid & (cls // block_size == true_task))}

    return counts


# ----------------------------------------------------------------------------------------------
# Set-up, state, one task, evaluation


def setup(cfg: BaselineConfig, scenario: Scenario, mesh: Mesh | None = None) -> Baseline:
    """Network, compiled step and counts function for ``cfg`` on ``scenario``; data-parallel over ``mesh``.

    Args:
      cfg: the run's hyperparameters (``method`` picks the baseline).
      scenario: the tasks, all with equally many classes.
      mesh: the data-parallel mesh (``parallel.make_mesh``; ``cfg.batch_size`` a multiple of its ``data`` axis),
        or None for one device.
    """
    k = block_size_of(scenario)
    check_batch_split(cfg.batch_size, mesh)
    T = scenario.task_count
    mean, std = norm_of(scenario)
    tx = training.make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay)
    features = subnets = val = None
    model = build(cfg, k * T, T if cfg.method == "packnet" else 1)
    kinds = models.leaf_kinds(models.init(model, jax.random.key(0), scenario.input_shape)[0])
    if cfg.method == "packnet":  # MIND's network: per-task batch norm, sub-networks by owner map
        apply_fn = model.apply
        cfg.inference.check(task_inference.SUBNET_RULES, all(len(task.val.y) for task in scenario.tasks))
        step = training.make_step(make_loss(apply_fn, k), tx, training.augmenting(mean, std, cfg.crop_flip))
        subnets = SubnetEvaluator(apply_fn, T, k, mean, std, kinds, cfg.eval_batch_size, mesh=mesh)
        val = evaluation.place([task.val for task in scenario.tasks], cfg.eval_batch_size, mesh)
        counts = None
        features = evaluation.make_subnet_features(apply_fn, mean, std)
        fisher_fn, block_counts = None, evaluation.make_block_counts(apply_fn, k, mean, std)
    else:
        apply_fn = _single_head_apply(model)
        teacher = (lambda ctx, x: apply_fn(ctx.old, x, ctx.task, train=False)) if cfg.method == "lwf" else None
        step = training.make_step(make_head_loss(apply_fn, cfg, k, global_labels=cfg.method == "joint"), tx,
                                  training.augmenting(mean, std, cfg.crop_flip, teacher=teacher))
        counts = make_head_counts(apply_fn, k, mean, std)
        fisher_fn = (ewc_fisher.make_fisher(apply_fn, k, mean, std, seen_classes=cfg.head == "seen")
                     if cfg.method == "ewc" else None)
        block_counts = None
    if mesh is not None:  # the same functions with sharding annotations; batches split along "data"
        step = parallel.data_parallel(step, mesh)
        if counts is not None:
            counts = parallel.data_parallel(counts, mesh, batch_argnums=(1, 2, 3), donate_argnums=())
        if features is not None:
            features = parallel.data_parallel(features, mesh, batch_argnums=(3,), donate_argnums=())
        if block_counts is not None:
            block_counts = parallel.data_parallel(block_counts, mesh, batch_argnums=(1, 2, 3), donate_argnums=())
    return Baseline(cfg, scenario, model, apply_fn, kinds, k, tx, step, counts, fisher_fn,
                    block_counts, features, subnets, val)


def init_state(b: Baseline, key: jax.Array) -> PyTree:
    """The network before any task (plus an all-free owner map for PackNet, a zero Fisher for EWC)."""
    params, batch_stats = models.init(b.model, key, b.scenario.input_shape)
    state = {"params": params, "batch_stats": batch_stats}
    if b.cfg.method == "packnet":
        state["owner"] = masks.init_owners(params, b.kinds, (b.block_size,) * b.task_count)
        state["inference"] = subnet_inference_stats(b.cfg.inference, b.model, b.scenario, b.block_size)
    if b.cfg.method == "ewc":
        state["fisher"] = jax.tree.map(jnp.zeros_like, params)
    return state


def pooled_split(scenario: Scenario, upto: int, block_size: int) -> Split:
    """Training data of tasks 0..upto pooled, labels as global class ids (task * block + local)."""
    parts = [scenario.tasks[j].train for j in range(upto + 1)]
    y = np.concatenate([p.y + j * block_size for j, p in enumerate(parts)]).astype(np.int32)
    return Split(np.concatenate([p.x for p in parts]), y, np.concatenate([p.y_global for p in parts]))


def fisher_diagonal(b: Baseline, variables: PyTree, split: Split, task: int) -> PyTree:
    """Diagonal empirical Fisher of ``task`` on the first ``ewc_samples`` training examples (a mean)."""
    return ewc_fisher.fisher_diagonal(b.fisher_fn, variables, split, task, b.cfg.ewc_samples)


def _copy(tree: PyTree) -> PyTree:
    """Fresh buffers (the train step donates its carry; a teacher or anchor must not alias it)."""
    return jax.tree.map(jnp.copy, tree)


def _run(b: Baseline, name: str, t: int, params, batch_stats, split, ctx: Context, epochs: int, key, log,
         progress):
    """One training phase of task ``t``; returns the carry."""
    phase = training.Phase(epochs, b.cfg.batch_size, b.cfg.lr, b.cfg.lr_milestone)
    return train_phase(b.step, b.tx, params, batch_stats, split, ctx, phase, key, task=t, name=name, log=log,
                       progress=progress)


def _prune_free(params: PyTree, owner: PyTree, kinds: PyTree) -> PyTree:
    """PackNet's pruning: gated weights no task kept are reset to zero (later tasks start them from zero)."""
    return jax.tree.map(lambda p, o, kind: jnp.where(o == masks.FREE, jnp.zeros_like(p), p)
                        if kind == masks.GATED else p, params, owner, kinds)


def _learn_packnet(b: Baseline, state: PyTree, t: int, key: jax.Array, log, progress) -> tuple[PyTree, dict]:
    cfg, task, T = b.cfg, b.scenario.tasks[t], b.task_count
    k_train, k_retrain, k_stats = jax.random.split(key, 3)
    params, batch_stats, owner = state["params"], state["batch_stats"], state["owner"]
    # Train the free weights; earlier tasks' weights compute but stay frozen.
    fwd, trn = masks.dense_masks(owner, t)
    params, batch_stats, _ = _run(b, "train", t, params, batch_stats, task.train, Context(jnp.int32(t), fwd, trn),
                                  cfg.epochs, k_train, log, progress)
    # Keep the largest trained |w| (a 1/N share of each layer, as MIND), prune the rest, retrain what was kept.
    owner = masks.assign(owner, b.kinds, t, T, policy="magnitude", weights=params)
    params = _prune_free(params, owner, b.kinds)
    fwd, trn = masks.forward_mask(owner, t), masks.trainable_mask(owner, t)
    params, batch_stats, _ = _run(b, "retrain", t, params, batch_stats, task.train,
                                  Context(jnp.int32(t), fwd, trn), cfg.retrain_epochs, k_retrain, log, progress)
    inference, choice = task_inference.update_subnet_inference(
        cfg.inference, state["inference"], b.scenario, t, task.train, b.val.take(range(t + 1)), b.features,
        b.subnets, (params, batch_stats, owner), cfg.eval_batch_size, k_stats, cfg.temperature)
    state = {"params": params, "batch_stats": batch_stats, "owner": owner, "inference": inference}
    info = {"task_inference": choice, "val_til_acc": evaluation.block_accuracy(
                b.block_counts, {"params": masks.gate(params, fwd), "batch_stats": batch_stats}, task.val, t,
                cfg.eval_batch_size),
            "capacity_left": masks.capacity_left(owner, b.kinds)}
    return state, info


def _learn_single_head(b: Baseline, state: PyTree, t: int, key: jax.Array, log, progress) -> tuple[PyTree, dict]:
    cfg, task = b.cfg, b.scenario.tasks[t]
    params, batch_stats = state["params"], state["batch_stats"]
    full = masks.full_mask(params)
    ctx, split = Context(jnp.int32(t), full, full), task.train
    if cfg.method == "lwf":
        ctx = ctx._replace(old=_copy({"params": params, "batch_stats": batch_stats}))
    elif cfg.method == "ewc":
        ctx = ctx._replace(anchor=_copy(params), fisher=state["fisher"])
    elif cfg.method == "joint":
        split = pooled_split(b.scenario, t, b.block_size)
    params, batch_stats, _ = _run(b, cfg.method, t, params, batch_stats, split, ctx, cfg.epochs, key, log,
                                  progress)
    state = {"params": params, "batch_stats": batch_stats}
    info = {}
    if cfg.method == "ewc":
        f_t = fisher_diagonal(b, state, task.train, t)
        state["fisher"] = jax.tree.map(jnp.add, ctx.fisher, f_t)
        info["fisher_mean"] = float(np.mean([float(jnp.mean(v)) for v in jax.tree.leaves(f_t)]))
    info["val_til_acc"] = float(evaluate(b, state, [task.val], t + 1, [t])["til"][0])
    return state, info


def learn_task(b: Baseline, state: PyTree, t: int, key: jax.Array, log: Callable[[dict], None] | None = None,
               progress: bool = False) -> tuple[PyTree, dict]:
    """Train task ``t`` into ``state``; returns the new state and a summary (val accuracy, seconds)."""
    start = time.perf_counter()
    learn = _learn_packnet if b.cfg.method == "packnet" else _learn_single_head
    state, info = learn(b, state, t, key, log, progress)
    return state, {"task": t, **info, "seconds": time.perf_counter() - start}


def evaluate(b: Baseline, state: PyTree, splits, seen: int, task_ids=None) -> dict[str, np.ndarray]:
    """Accuracy per rule (til, cil[, task_id and every task-inference rule]) on ``splits`` of ``task_ids``."""
    if b.cfg.method == "packnet":
        return subnet_accuracies(b.subnets, b.cfg.inference, state, splits, seen, b.cfg.temperature,
                                 b.cfg.eval_batch_size, task_ids)
    return evaluation.accuracies(b.counts, ({"params": state["params"], "batch_stats": state["batch_stats"]},),
                                 splits, seen, b.cfg.eval_batch_size, task_ids)


def learner(cfg: BaselineConfig, scenario: Scenario, mesh: Mesh | None = None) -> Learner:
    """A baseline (fine-tuning, joint, PackNet, LwF, EWC) as a ``Learner``; data-parallel over ``mesh`` if given.

    Args:
      cfg: the run's hyperparameters (``method`` picks the baseline).
      scenario: the tasks (see ``setup``).
      mesh: the data-parallel mesh, or None for one device.
    """
    b = setup(cfg, scenario, mesh)
    placed = functools.cache(lambda: evaluation.place([task.test for task in scenario.tasks], cfg.eval_batch_size,
                                                      mesh))
    tests = (lambda: placed()) if cfg.method == "packnet" else (lambda: [task.test for task in scenario.tasks])
    return Learner(name=cfg.method, rules=b.rules, init_state=lambda key: init_state(b, key),
                   learn_task=lambda state, t, key, **kw: learn_task(b, state, t, key, **kw),
                   evaluate=lambda state, seen: evaluate(b, state, tests(), seen),
                   param_counts=lambda state: {"model": models.param_count(state["params"])},
                   report=(lambda state, infos: task_inference.inference_report(
                       state["inference"], task_inference.SUBNET_RULES, infos)) if cfg.method == "packnet" else None,
                   describe=(lambda info: f"task inference {info['task_inference']['rule']}")
                   if cfg.method == "packnet" else None,
                   **scenario_fields(scenario))
