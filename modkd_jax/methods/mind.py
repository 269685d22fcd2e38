"""MIND (Bonato et al., AAAI 2024): parameter isolation by owner maps plus distillation.

Per task t of N: train a fresh dense teacher (cross-entropy); give task t a 1/N
share of every gated layer's free weights; distil the teacher into sub-network
t with the paper's CE + beta * L_SD, L_SD = 1/2 [KL(p_t||p_s) + KL(p_s||p_t)]
at the distillation temperature (1 by default), only t's weights updated
through ``optim.gated``; t's batch-norm row and class block travel with it. The
self-distillation variant trains the student's free weights on the task
instead, keeps the largest trained ``|w|`` and distils the dense student into
that share. The inference temperature tau is a separate setting: the
reference's value for the dataset, or chosen on the seen tasks' validation
data after every task. Unlike the public reference, earlier tasks are *gated*
(never updated then restored), batch norm is per task and magnitude selection
ranks trained weights (README: "Differences from the reference").

State is an explicit pytree ``{"params", "batch_stats", "owner", "tau"}``;
``learn_task`` maps (state, task) to the next state.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from modkd_jax import losses, masks, models, parallel, training
from modkd_jax.data.scenarios import Scenario

PyTree = Any


@dataclasses.dataclass(frozen=True)
class MindConfig:
    """Hyperparameters of a MIND run (defaults: the paper's CIFAR-100/10 protocol)."""

    arch: str = "resnet32"
    hidden: tuple[int, ...] = (400, 400)  # MLP widths
    epochs: int = 50  # teacher (or self-training) epochs
    distill_epochs: int = 50
    batch_size: int = 256
    lr: float = 0.005
    distill_lr: float = 0.035
    lr_milestone: float = 0.7  # teacher lr halved at 35 of 50 epochs
    distill_milestone: float = 0.8  # distillation lr halved at 40 of 50
    optimizer: str = "adam"
    weight_decay: float = 0.0
    beta: float = 5.0
    distill_loss: str = "symkl"  # the paper's L_SD; "js" (true Jensen-Shannon) or "kd" (Hinton) as options
    distill_temperature: float = 1.0  # T of the distillation term (scaled by T^2); never the inference tau
    temperature: float | None = 6.5  # inference tau (reference: CIFAR-100); None: chosen on validation per task
    tau_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 6.5, 10.0, 20.0)  # candidates when temperature is None
    policy: str = "random"
    self_distillation: bool = False
    init_new: str = "zero"  # tasks > 0: new weights start at zero (reference) or "keep" their random init
    crop_flip: bool = True
    brightness: float = 0.0  # brightness jitter d: images scaled by U[1 - d, 1 + d] (reference CIFAR: 63/255)
    drop_last: bool = False  # the reference trains on the last partial batch too
    teacher_bn: str = "running"  # teacher's batch norm while distilling: "running" statistics, or "batch" (train mode)
    bn_init: str = "fresh"  # task t's batch-norm row starts "fresh" (1 / 0) or as a "copy" of row t-1 (reference)
    eval_batch_size: int = 512

    def __post_init__(self):
        if self.distill_loss not in losses.DISTILL_LOSSES:
            raise ValueError(f"unknown distillation loss {self.distill_loss!r}; "
                             f"expected one of {', '.join(losses.DISTILL_LOSSES)}")
        if self.distill_temperature <= 0 or (self.temperature is not None and self.temperature <= 0):
            raise ValueError("temperatures must be positive")
        if self.temperature is None and (not self.tau_grid or min(self.tau_grid) <= 0):
            raise ValueError("tau_grid must hold positive temperatures to choose from")
        if self.policy not in ("random", "magnitude"):
            raise ValueError(f"unknown selection policy {self.policy!r}; expected 'random' or 'magnitude'")
        if self.init_new not in ("zero", "keep"):
            raise ValueError(f"unknown init {self.init_new!r}; expected 'zero' or 'keep'")
        if self.teacher_bn not in ("running", "batch") or self.bn_init not in ("fresh", "copy"):
            raise ValueError(f"teacher_bn must be 'running' or 'batch' and bn_init 'fresh' or 'copy', "
                             f"got {self.teacher_bn!r}, {self.bn_init!r}")
        if min(self.epochs, self.distill_epochs, self.batch_size) < 1:
            raise ValueError("epochs, distill_epochs and batch_size must be at least 1")


def block_size_of(scenario: Scenario) -> int:
    """The common class-block size; MIND's one compiled step needs equal blocks."""
    sizes = set(scenario.block_sizes)
    if len(sizes) != 1:
        raise ValueError(f"MIND needs tasks with equally many classes, got block sizes {scenario.block_sizes}")
    return sizes.pop()


def _build(cfg: MindConfig, num_outputs: int, num_tasks: int):
    kwargs = {"hidden": tuple(cfg.hidden)} if cfg.arch == "mlp" else {}
    return models.build(cfg.arch, num_outputs, num_tasks, **kwargs)


@dataclasses.dataclass(frozen=True)
class Mind:
    """Everything static about a run: networks, compiled steps and evaluators. Build once per run."""

    cfg: MindConfig
    scenario: Scenario
    student: Any
    teacher: Any
    kinds: PyTree
    block_size: int
    steps: dict[str, Callable]
    subnet_eval: Callable
    tau_eval: Callable
    teacher_eval: Callable
    student_eval: Callable

    @property
    def task_count(self) -> int:
        return self.scenario.task_count


def setup(cfg: MindConfig, scenario: Scenario, mesh: Mesh | None = None) -> Mind:
    """Networks, compiled steps and evaluators for ``cfg`` on ``scenario``.

    With a ``mesh`` (``parallel.make_mesh``) the same steps and evaluators run
    data-parallel: batches split along ``data``, everything else replicated.
    """
    k = block_size_of(scenario)
    if mesh is not None and cfg.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {mesh.shape['data']} devices; "
                         f"use a multiple of {mesh.shape['data']}")
    T = scenario.task_count
    student = _build(cfg, k * T, T)
    teacher = _build(cfg, k, 1)
    params, _ = models.init(student, jax.random.key(0), scenario.input_shape)
    kinds = models.leaf_kinds(params)
    mean, std = (tuple(float(v) for v in a) for a in scenario.norm)
    if cfg.temperature is None and any(len(task.val.y) == 0 for task in scenario.tasks):
        raise ValueError("choosing the inference temperature needs validation data: pass --val_fraction > 0 "
                         "or a fixed --temperature")
    common = dict(block_size=k, mean=mean, std=std, crop_flip=cfg.crop_flip, brightness=cfg.brightness,
                  beta=cfg.beta, temperature=cfg.distill_temperature)
    tx_teacher = training.make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay)
    tx_distill = training.make_optimizer(cfg.optimizer, cfg.distill_lr, cfg.weight_decay)

    batch_bn = cfg.teacher_bn == "batch"  # train-mode BN: batch statistics, the updated running ones dropped

    def frozen_logits(apply_fn, v, x, task):
        out = apply_fn(v, x, task, train=batch_bn, mutable=["batch_stats"] if batch_bn else False)
        return out[0] if batch_bn else out

    def teacher_logits(v, x, task):
        return frozen_logits(teacher.apply, v, x, 0)

    def self_teacher_logits(v, x, task):
        return training.block(frozen_logits(student.apply, v, x, task), task, k)

    steps = {
        "teacher": training.make_train_step(training.StepSpec(teacher.apply, loss="ce", **common), tx_teacher),
        "self_train": training.make_train_step(training.StepSpec(student.apply, loss="ce", **common), tx_teacher),
        "distill": training.make_train_step(training.StepSpec(student.apply, loss=cfg.distill_loss, **common),
                                            tx_distill, teacher_logits),
        "self_distill": training.make_train_step(training.StepSpec(student.apply, loss=cfg.distill_loss, **common),
                                                 tx_distill, self_teacher_logits),
    }
    evals = (training.make_subnet_eval(student.apply, T, k, mean, std),
             training.make_tau_eval(student.apply, T, k, mean, std),
             training.make_dense_eval(teacher.apply, k, mean, std),
             training.make_dense_eval(student.apply, k, mean, std))
    if mesh is not None:  # the same functions, with sharding annotations (parallel.data_parallel)
        steps = {name: parallel.data_parallel(step, mesh) for name, step in steps.items()}
        evals = (*(parallel.data_parallel(e, mesh, batch_argnums=(3, 4, 5), donate_argnums=()) for e in evals[:2]),
                 *(parallel.data_parallel(e, mesh, batch_argnums=(1, 2, 3), donate_argnums=()) for e in evals[2:]))
    steps["tx_teacher"], steps["tx_distill"] = tx_teacher, tx_distill
    return Mind(cfg, scenario, student, teacher, kinds, k, steps, *evals)


def init_state(mind: Mind, key: jax.Array) -> PyTree:
    """The student before any task: random weights, all gated weights free."""
    params, batch_stats = models.init(mind.student, key, mind.scenario.input_shape)
    owner = masks.init_owners(params, mind.kinds, (mind.block_size,) * mind.task_count)
    tau = 1.0 if mind.cfg.temperature is None else mind.cfg.temperature  # replaced once chosen on validation
    return {"params": params, "batch_stats": batch_stats, "owner": owner, "tau": jnp.float32(tau)}


def copy_bn_row(params: PyTree, kinds: PyTree, batch_stats: PyTree, t: int) -> tuple[PyTree, PyTree]:
    """Per-task batch-norm parameters and statistics with row ``t`` set to row ``t - 1``."""
    copy = lambda x: x.at[t].set(x[t - 1])  # noqa: E731
    params = jax.tree.map(lambda p, kind: copy(p) if kind == masks.PER_TASK else p, params, kinds)
    return params, jax.tree.map(copy, batch_stats)


def _phase(mind: Mind, name: str, carry, split, *, epochs, lr, milestone, key, task, fwd, trn,
           teacher_vars=None, log=None, progress=True):
    def tagged(m):
        if log is not None:
            log({"task": task, "phase": name, **m})

    return training.run_phase(mind.steps[name], carry, split, epochs=epochs, batch_size=mind.cfg.batch_size,
                              base_lr=lr, milestone=milestone, key=key, task=task, fwd_mask=fwd, trn_mask=trn,
                              teacher_vars=teacher_vars, desc=f"task {task} {name}", log=tagged,
                              progress=progress, drop_last=mind.cfg.drop_last)


def learn_task(mind: Mind, state: PyTree, t: int, key: jax.Array, log: Callable[[dict], None] | None = None,
               progress: bool = True) -> tuple[PyTree, dict]:
    """Train task ``t`` into ``state``; returns the new state and a summary (val accuracies, seconds)."""
    cfg, task = mind.cfg, mind.scenario.tasks[t]
    k_teacher, k_sel, k_phase1, k_phase2 = jax.random.split(key, 4)
    params, batch_stats, owner = state["params"], state["batch_stats"], state["owner"]
    if cfg.bn_init == "copy" and t > 0:  # the reference: task t's batch norm starts where task t-1's ended
        params, batch_stats = copy_bn_row(params, mind.kinds, batch_stats, t)
    info: dict[str, Any] = {"task": t}
    start = time.perf_counter()
    if not cfg.self_distillation:
        t_params, t_bs = models.init(mind.teacher, k_teacher, mind.scenario.input_shape)
        full = masks.full_mask(t_params)
        carry = (t_params, t_bs, mind.steps["tx_teacher"].init(t_params))
        carry = _phase(mind, "teacher", carry, task.train, epochs=cfg.epochs, lr=cfg.lr, milestone=cfg.lr_milestone,
                       key=k_phase1, task=0, fwd=full, trn=full, log=log, progress=progress)
        teacher_vars = {"params": carry[0], "batch_stats": carry[1]}
        info["teacher_val_acc"] = training.dense_accuracy(mind.teacher_eval, teacher_vars, task.val, 0,
                                                          cfg.eval_batch_size)
        # Magnitude ranks the *trained* teacher's kernels (same shapes as the student's gated layers).
        owner = masks.assign(owner, mind.kinds, t, mind.task_count, policy=cfg.policy, key=k_sel,
                             weights=teacher_vars["params"] if cfg.policy == "magnitude" else None)
        if t > 0:  # task 0 keeps its random init: an all-zero sub-network has no gradient to grow from
            params = masks.reinit_assigned(params, owner, mind.kinds, t, cfg.init_new)
        distill_step = "distill"
    else:
        # Train the dense student (tasks < t frozen, all free weights trainable) on the task ...
        owned_or_free = jax.tree.map(lambda o: (o <= t), owner)  # FREE (-1) <= t too
        trainable = jax.tree.map(lambda o: (o == masks.FREE) | (o == t), owner)
        carry = (params, batch_stats, mind.steps["tx_teacher"].init(params))
        params, batch_stats, _ = _phase(mind, "self_train", carry, task.train, epochs=cfg.epochs, lr=cfg.lr,
                                        milestone=cfg.lr_milestone, key=k_phase1, task=t, fwd=owned_or_free,
                                        trn=trainable, log=log, progress=progress)
        # a snapshot: the distillation step donates (and so invalidates) the student's own buffers
        teacher_vars = {"params": masks.gate(params, owned_or_free), "batch_stats": jax.tree.map(jnp.copy, batch_stats)}
        # ... keep the largest trained |w| among the free weights, and distil the dense net into them.
        owner = masks.assign(owner, mind.kinds, t, mind.task_count, policy="magnitude", weights=params)
        distill_step = "self_distill"
    fwd, trn = masks.forward_mask(owner, t), masks.trainable_mask(owner, t)
    carry = (params, batch_stats, mind.steps["tx_distill"].init(params))
    params, batch_stats, _ = _phase(mind, distill_step, carry, task.train, epochs=cfg.distill_epochs,
                                    lr=cfg.distill_lr, milestone=cfg.distill_milestone, key=k_phase2, task=t,
                                    fwd=fwd, trn=trn, teacher_vars=teacher_vars, log=log, progress=progress)
    tau = state["tau"]
    if cfg.temperature is None:  # choose tau on the seen tasks' validation splits (never the test split)
        chosen, val_cil = training.choose_tau(mind.tau_eval, params, batch_stats, owner,
                                              [mind.scenario.tasks[j].val for j in range(t + 1)], t + 1,
                                              cfg.eval_batch_size, cfg.tau_grid)
        tau = jnp.float32(chosen)
        info["tau_val_cil"] = {str(k): v for k, v in val_cil.items()}
    info["tau"] = float(tau)
    state = {"params": params, "batch_stats": batch_stats, "owner": owner, "tau": tau}
    student_vars = {"params": masks.gate(params, fwd), "batch_stats": batch_stats}
    info["student_val_til_acc"] = training.dense_accuracy(mind.student_eval, student_vars, task.val, t,
                                                          cfg.eval_batch_size)
    info["capacity_left"] = masks.capacity_left(owner, mind.kinds)
    info["seconds"] = time.perf_counter() - start
    return state, info


def evaluate(mind: Mind, state: PyTree, splits, seen: int, task_ids=None) -> dict[str, np.ndarray]:
    """Accuracy per rule (til, cil, cil_entropy, task_id) on ``splits`` of tasks ``task_ids`` (default 0..).

    The class-incremental rules read ``softmax(z / tau)`` at the state's inference temperature.
    """
    return training.evaluate_tasks(mind.subnet_eval, state["params"], state["batch_stats"], state["owner"],
                                   splits, seen, mind.cfg.eval_batch_size, task_ids, tau=float(state["tau"]))
