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
ranks trained weights (docs/mind.md: "Differences from the reference").

State is an explicit pytree ``{"params", "batch_stats", "owner", "tau"}``;
``learn_task`` maps (state, task) to the next state.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from modkd_jax import evaluation, losses, masks, models, parallel, routing, task_inference, training
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.methods import from_preset
from modkd_jax.methods.kit import (Context, block_size_of, build, check_batch_split, make_loss, norm_of,
                                   subnet_accuracies, subnet_inference_stats, train_phase)
from modkd_jax.subnet_eval import SubnetEvaluator
from modkd_jax.data.scenarios import Scenario

PyTree = Any
NO_TASK = masks.FREE - 1  # a task id that owns no weight


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
    lr_milestones: tuple[float, ...] = (0.7,)  # teacher lr halved at these fractions of its epochs (35 of 50)
    distill_milestones: tuple[float, ...] = (0.8,)  # distillation lr halved at these fractions (40 of 50)
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
    crop_pad: int = 4  # zero padding of the random crop (reference: 4 at 32x32, 8 on TinyImageNet; 0: flip only)
    brightness: float = 0.0  # brightness jitter d: images scaled by U[1 - d, 1 + d] (reference CIFAR: 63/255)
    drop_last: bool = False  # the reference trains on the last partial batch too
    teacher_bn: str = "running"  # teacher's batch norm while distilling: "running" statistics, or "batch" (train mode)
    bn_init: str = "fresh"  # task t's batch-norm row starts "fresh" (1 / 0) or as a "copy" of row t-1 (reference)
    eval_batch_size: int = 512
    eval_strategy: str = "map"  # every sub-network in evaluation: one after another ("map") or batched ("vmap")
    inference: task_inference.InferenceConfig = task_inference.InferenceConfig()  # class-incremental task inference

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
        if self.eval_strategy not in routing.STRATEGIES:
            raise ValueError(f"unknown eval_strategy {self.eval_strategy!r}; expected one of "
                             f"{', '.join(routing.STRATEGIES)}")
        if self.crop_pad < 0 or not all(0 < m <= 1 for m in (*self.lr_milestones, *self.distill_milestones)):
            raise ValueError("crop_pad must be >= 0 and learning-rate milestones fractions in (0, 1]")
        if min(self.epochs, self.distill_epochs, self.batch_size) < 1:
            raise ValueError("epochs, distill_epochs and batch_size must be at least 1")


# Per-dataset presets: MindConfig fields plus the scenario's task count and validation share. CIFAR-100,
# TinyImageNet, CORe50 and Synbols are the paper's protocol as its reference code runs it (whole training
# split, its epochs, learning-rate milestones, augmentation and tau: exp/*.sh and utils/transforms.py);
# datasets without a reference tau choose it on the seen tasks' validation split (None).
REFERENCE_BRIGHTNESS = 63 / 255
_PAPER = dict(task_count=10, val_fraction=0.0, inference=task_inference.InferenceConfig(task_inference="max_prob"))
_SMALL = dict(arch="mlp", epochs=5, distill_epochs=5, batch_size=128, lr=0.001, distill_lr=0.005, crop_flip=False,
              brightness=0.0, temperature=None, task_count=5, val_fraction=0.1)
PRESETS = {
    "cifar100": dict(_PAPER, brightness=REFERENCE_BRIGHTNESS),
    "tinyimagenet": dict(_PAPER, epochs=100, lr_milestones=(0.7, 0.9), distill_epochs=120,
                         distill_milestones=(80 / 120, 110 / 120), crop_pad=8, brightness=REFERENCE_BRIGHTNESS,
                         temperature=12.0),
    "core50": dict(_PAPER, epochs=20, lr_milestones=(0.75,), distill_epochs=20, distill_milestones=(0.75,),
                   brightness=0.5, temperature=3.0),  # the reference also jitters hue by 0.3 (not here)
    "synbols": dict(_PAPER, epochs=25, lr_milestones=(0.4, 0.8), distill_epochs=25, distill_milestones=(0.6,),
                    crop_pad=0, temperature=4.0),  # flips only
    "cifar10": dict(task_count=5, val_fraction=0.1, brightness=REFERENCE_BRIGHTNESS, temperature=None),
    "mnist": _SMALL,
    "fashion_mnist": _SMALL,
    "digits": {**_SMALL, "epochs": 30, "distill_epochs": 30, "batch_size": 64, "hidden": (128, 128)},
}


def preset_config(dataset: str, **overrides) -> MindConfig:
    """The MindConfig of a dataset's preset (``PRESETS``), with ``overrides``.

    Args:
      dataset: a key of ``PRESETS``.
      **overrides: ``MindConfig`` fields that replace the preset's.
    """
    return from_preset(MindConfig, PRESETS[dataset], **overrides)


@dataclasses.dataclass(frozen=True)
class Mind:
    """Everything static about a run: networks, compiled steps and counts functions. Build once per run."""

    cfg: MindConfig
    scenario: Scenario
    student: Any
    teacher: Any
    kinds: PyTree
    block_size: int
    steps: dict[str, Callable]
    txs: dict[str, Any]
    subnets: SubnetEvaluator  # every sub-network: test accuracies, the temperature and the rule on validation
    features: Callable
    teacher_counts: Callable
    student_counts: Callable
    val: evaluation.Placed  # every task's validation split, on the device once
    capacity: int  # rows of every task's device-resident training split (the largest task's)
    mesh: Mesh | None = None

    @property
    def task_count(self) -> int:
        return self.scenario.task_count


def setup(cfg: MindConfig, scenario: Scenario, mesh: Mesh | None = None) -> Mind:
    """Networks, compiled steps and counts functions for ``cfg`` on ``scenario``.

    Args:
      cfg: the run's hyperparameters.
      scenario: the tasks, all with equally many classes (with validation splits where ``cfg`` chooses the
        temperature or the task-inference rule on them).
      mesh: a ``parallel.make_mesh`` mesh: the same steps and evaluators run data-parallel, batches split along
        ``data``, everything else replicated (``cfg.batch_size`` a multiple of its ``data`` axis). None: one device.
    """
    k = block_size_of(scenario)
    check_batch_split(cfg.batch_size, mesh)
    T = scenario.task_count
    student = build(cfg, k * T, T)
    teacher = build(cfg, k, 1)
    params, _ = models.init(student, jax.random.key(0), scenario.input_shape)
    kinds = models.leaf_kinds(params)
    mean, std = norm_of(scenario)
    if cfg.temperature is None and any(len(task.val.y) == 0 for task in scenario.tasks):
        raise ValueError("choosing the inference temperature needs validation data: pass --val_fraction > 0 "
                         "or a fixed --temperature")
    txs = {"teacher": training.make_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay),
           "distill": training.make_optimizer(cfg.optimizer, cfg.distill_lr, cfg.weight_decay)}
    batch_bn = cfg.teacher_bn == "batch"  # train-mode BN: batch statistics, the updated running ones dropped

    def frozen_logits(apply_fn, v, x, task):
        out = apply_fn(v, x, task, train=batch_bn, mutable=["batch_stats"] if batch_bn else False)
        return out[0] if batch_bn else out

    def teacher_logits(ctx, x):
        return frozen_logits(teacher.apply, ctx.teacher, x, 0)

    def self_teacher_logits(ctx, x):
        return training.block(frozen_logits(student.apply, ctx.teacher, x, ctx.task), ctx.task, k)

    aug = dict(mean=mean, std=std, crop_flip=cfg.crop_flip, pad=cfg.crop_pad, brightness=cfg.brightness)
    ce_teacher, ce_student = make_loss(teacher.apply, k), make_loss(student.apply, k)
    distill = make_loss(student.apply, k, cfg.distill_loss, cfg.beta, cfg.distill_temperature)
    steps = {
        "teacher": training.make_step(ce_teacher, txs["teacher"], training.augmenting(**aug)),
        "self_train": training.make_step(ce_student, txs["teacher"], training.augmenting(**aug)),
        "distill": training.make_step(distill, txs["distill"], training.augmenting(**aug, teacher=teacher_logits)),
        "self_distill": training.make_step(distill, txs["distill"],
                                           training.augmenting(**aug, teacher=self_teacher_logits)),
    }
    cfg.inference.check(task_inference.SUBNET_RULES, all(len(task.val.y) for task in scenario.tasks))
    subnets = SubnetEvaluator(student.apply, T, k, mean, std, kinds, cfg.eval_batch_size, cfg.eval_strategy, mesh)
    counts = (evaluation.make_subnet_features(student.apply, mean, std),
              evaluation.make_block_counts(teacher.apply, k, mean, std),
              evaluation.make_block_counts(student.apply, k, mean, std))
    if mesh is not None:  # the same functions, with sharding annotations (parallel.data_parallel)
        steps = {name: parallel.data_parallel(step, mesh) for name, step in steps.items()}
        counts = (parallel.data_parallel(counts[0], mesh, batch_argnums=(3,), donate_argnums=()),
                  *(parallel.data_parallel(c, mesh, batch_argnums=(1, 2, 3), donate_argnums=()) for c in counts[1:]))
    val = evaluation.place([task.val for task in scenario.tasks], cfg.eval_batch_size, mesh)
    capacity = max(len(task.train.y) for task in scenario.tasks)
    return Mind(cfg, scenario, student, teacher, kinds, k, steps, txs, subnets, *counts, val=val, capacity=capacity,
                mesh=mesh)


def init_state(mind: Mind, key: jax.Array) -> PyTree:
    """The student before any task: random weights, all gated weights free."""
    params, batch_stats = models.init(mind.student, key, mind.scenario.input_shape)
    owner = masks.init_owners(params, mind.kinds, (mind.block_size,) * mind.task_count)
    tau = 1.0 if mind.cfg.temperature is None else mind.cfg.temperature  # replaced once chosen on validation
    inference = subnet_inference_stats(mind.cfg.inference, mind.student, mind.scenario, mind.block_size)
    return {"params": params, "batch_stats": batch_stats, "owner": owner, "tau": jnp.float32(tau),
            "inference": inference}


def copy_bn_row(params: PyTree, kinds: PyTree, batch_stats: PyTree, t: int) -> tuple[PyTree, PyTree]:
    """Per-task batch-norm parameters and statistics with row ``t`` set to row ``t - 1``."""
    copy = lambda x: x.at[t].set(x[t - 1])  # noqa: E731
    params = jax.tree.map(lambda p, kind: copy(p) if kind == masks.PER_TASK else p, params, kinds)
    return params, jax.tree.map(copy, batch_stats)


def _phase(mind: Mind, name: str, t: int, params, batch_stats, split, ctx: Context, key, log, progress):
    """One training phase of task ``t`` (teacher / self-training or distillation); returns the carry."""
    cfg = mind.cfg
    distilling = name in ("distill", "self_distill")
    phase = training.Phase(cfg.distill_epochs if distilling else cfg.epochs, cfg.batch_size,
                           cfg.distill_lr if distilling else cfg.lr,
                           cfg.distill_milestones if distilling else cfg.lr_milestones, cfg.drop_last)
    return train_phase(mind.steps[name], mind.txs["distill" if distilling else "teacher"], params, batch_stats, split,
                       ctx, phase, key, task=t, name=name, log=log, progress=progress)


def learn_task(mind: Mind, state: PyTree, t: int, key: jax.Array, log: Callable[[dict], None] | None = None,
               progress: bool = False) -> tuple[PyTree, dict]:
    """Train task ``t`` into ``state``; returns the new state and a summary (val accuracies, seconds)."""
    cfg, task = mind.cfg, mind.scenario.tasks[t]
    k_teacher, k_sel, k_phase1, k_phase2, k_stats = jax.random.split(key, 5)
    params, batch_stats, owner = state["params"], state["batch_stats"], state["owner"]
    if cfg.bn_init == "copy" and t > 0:  # the reference: task t's batch norm starts where task t-1's ended
        params, batch_stats = copy_bn_row(params, mind.kinds, batch_stats, t)
    info: dict[str, Any] = {"task": t}
    start = time.perf_counter()
    train = training.place_split(task.train, mind.capacity, mind.mesh)  # on the device once, one shape every task
    val = mind.val.take([t])
    t_arr = jnp.int32(t)
    if not cfg.self_distillation:
        t_params, t_bs = models.init(mind.teacher, k_teacher, mind.scenario.input_shape)
        full = masks.full_mask(t_params)
        carry = _phase(mind, "teacher", t, t_params, t_bs, train, Context(jnp.int32(0), full, full), k_phase1,
                       log, progress)
        teacher_vars = {"params": carry[0], "batch_stats": carry[1]}
        info["teacher_val_acc"] = evaluation.block_accuracy(mind.teacher_counts, teacher_vars, val, 0,
                                                            cfg.eval_batch_size)
        # Magnitude ranks the *trained* teacher's kernels (same shapes as the student's gated layers).
        owner = masks.assign(owner, mind.kinds, t, mind.task_count, policy=cfg.policy, key=k_sel,
                             weights=teacher_vars["params"] if cfg.policy == "magnitude" else None)
        # task 0 keeps its random init (an all-zero sub-network has no gradient to grow from): it resets the
        # weights of no task, so every task runs the same ops and task 1 compiles nothing new
        params = masks.reinit_assigned(params, owner, mind.kinds, t if t > 0 else NO_TASK, cfg.init_new)
        distill_step = "distill"
    else:
        # Train the dense student (tasks < t frozen, all free weights trainable) on the task ...
        owned_or_free, trainable = masks.dense_masks(owner, t)
        params, batch_stats, _ = _phase(mind, "self_train", t, params, batch_stats, train,
                                        Context(t_arr, owned_or_free, trainable), k_phase1, log, progress)
        # a snapshot: the distillation step donates (and so invalidates) the student's own buffers
        teacher_vars = {"params": masks.gate(params, owned_or_free), "batch_stats": jax.tree.map(jnp.copy, batch_stats)}
        # ... keep the largest trained |w| among the free weights, and distil the dense net into them.
        owner = masks.assign(owner, mind.kinds, t, mind.task_count, policy="magnitude", weights=params)
        distill_step = "self_distill"
    fwd, trn = masks.forward_mask(owner, t), masks.trainable_mask(owner, t)
    params, batch_stats, _ = _phase(mind, distill_step, t, params, batch_stats, train,
                                    Context(t_arr, fwd, trn, teacher_vars), k_phase2, log, progress)
    tau = state["tau"]
    if cfg.temperature is None:  # choose tau on the seen tasks' validation splits (never the test split)
        chosen, val_cil = mind.subnets.choose_tau((params, batch_stats, owner, state["inference"]),
                                                  mind.val.take(range(t + 1)), t + 1, cfg.tau_grid)
        tau = jnp.float32(chosen)
        info["tau_val_cil"] = {str(k): v for k, v in val_cil.items()}
    info["tau"] = float(tau)
    # the task's inference statistics (its training data only), then the rule in use on the seen tasks' validation
    inference, info["task_inference"] = task_inference.update_subnet_inference(
        cfg.inference, state["inference"], mind.scenario, t, train, mind.val.take(range(t + 1)), mind.features,
        mind.subnets, (params, batch_stats, owner), cfg.eval_batch_size, k_stats, tau)
    state = {"params": params, "batch_stats": batch_stats, "owner": owner, "tau": tau, "inference": inference}
    student_vars = {"params": masks.gate(params, fwd), "batch_stats": batch_stats}
    info["student_val_til_acc"] = evaluation.block_accuracy(mind.student_counts, student_vars, val, t,
                                                            cfg.eval_batch_size)
    info["capacity_left"] = masks.capacity_left(owner, mind.kinds)
    info["seconds"] = time.perf_counter() - start
    return state, info


def evaluate(mind: Mind, state: PyTree, splits, seen: int, task_ids=None) -> dict[str, np.ndarray]:
    """Accuracy per rule (til; cil and task_id of the rule in use and of every rule) on ``splits`` of ``task_ids``.

    ``max_prob``, ``entropy`` and ``top2_entropy`` read ``softmax(z / tau)`` at the state's inference temperature.
    """
    return subnet_accuracies(mind.subnets, mind.cfg.inference, state, splits, seen, float(state["tau"]),
                             mind.cfg.eval_batch_size, task_ids)


def describe(info: dict) -> str:
    """The per-task line's extras: capacity left, the inference temperature and the task-inference rule in use."""
    return (f"capacity left {100 * info['capacity_left']:.1f}%  tau {info['tau']:g}  "
            f"task inference {info['task_inference']['rule']}")


def learner(cfg: MindConfig, scenario: Scenario, mesh: Mesh | None = None) -> Learner:
    """MIND (or its self-distillation variant) as a ``Learner``; data-parallel over ``mesh`` if given.

    Args:
      cfg: the run's hyperparameters (``self_distillation`` picks the variant).
      scenario: the tasks (see ``setup``).
      mesh: the data-parallel mesh (``parallel.make_mesh``), or None for one device.
    """
    m = setup(cfg, scenario, mesh=mesh)
    teacher = models.param_count(models.init(m.teacher, jax.random.key(0), scenario.input_shape)[0])
    tests = functools.cache(lambda: evaluation.place([task.test for task in scenario.tasks], cfg.eval_batch_size, mesh))
    return Learner(
        name="mind_self_distillation" if cfg.self_distillation else "mind",
        rules=("til", "cil", "task_id"),  # headline; evaluate also gives cil_<rule> / task_id_<rule> of every rule
        init_state=lambda key: init_state(m, key),
        learn_task=lambda state, t, key, **kw: learn_task(m, state, t, key, **kw),
        evaluate=lambda state, seen: evaluate(m, state, tests(), seen),
        param_counts=lambda state: {"student": models.param_count(state["params"]), "teacher": teacher},
        report=lambda state, infos: {"inference_temperature": [i["tau"] for i in infos],
                                     **task_inference.inference_report(state["inference"], task_inference.SUBNET_RULES,
                                                                   infos)},
        describe=describe, **scenario_fields(scenario))
