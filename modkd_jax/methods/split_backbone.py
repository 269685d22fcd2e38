"""Online continual learning with a split ResNet-18: frozen, shared and per-task layers (docs/split_backbone.md).

The network is the one ``models.resnet18`` (stem of ``STEM_MODES``), seen as a
list of *layers* in forward order, each a conv with its batch norm::

    stem, stage0_block0.conv1, stage0_block0.conv2, ..., stage1_block0.proj,
    stage1_block0.conv1, ..., stage3_block1.conv2, head

A budget "F-S-T" (millions of parameters) cuts the list at two layer
boundaries (``resolve_budget``): the first layers are **frozen**, the middle
ones **shared** (small learning rate), the last ones (always the classifier)
**per task** (high learning rate). The groups are parameter paths
(``SplitBackbone.plan``: module path -> group) injected into the ResNet:

* frozen: one kernel, batch norm in eval mode with one row of statistics that
  never moves; zero updates (``optim.frozen`` inside ``optim.per_group_lr``).
* shared: one kernel and BN scale/bias, but running statistics *per task*
  (rows selected by the task id): with one set for all tasks, MNIST's were
  overwritten by Fashion-MNIST's and MNIST's accuracy fell from 83.7% to 74.3%,
  all of the forgetting of the 6.5-2.3-2.4 split (demo subset, seed 0).
* task: kernels and BN rows with a leading task axis (``layers.Conv(num_tasks=T)``,
  ``layers.TaskBatchNorm``), the classifier a class block of ``head_width``
  outputs per task; ``optim.gated``'s mask keeps the other tasks' rows
  bit-identical.

Statistics move only with their task's examples (a mixed batch weights them by
task membership). Every task's network is one ``vmap`` over task ids: the
frozen layers do not depend on the task, so they run once; shared and task
layers once per task. Small inputs: the ImageNet stem keeps its 7x7 kernel
(ImageNet weights load): ``"imagenet"`` (32 px -> 8 px), ``"no_pool"`` (the
default; 16 px) or ``"stride1"`` (32 px, ~4x the compute of ``no_pool``).
Setting 1 is a ``Learner`` (``learner``): state ``{"params", "batch_stats"}``, that
ResNet's trees (the optimizer state starts fresh every task); the train step is
``training.make_step``'s, evaluation ``evaluation.accuracies``'. Setting 2
(``setting2``, one merged stream) uses the same step (mixed form) and counts.
The network (layers, budget, groups, trees, forward pass) is
``methods.split_backbone_net``; optimizer, loss, train step and the online pass
``methods.split_backbone_step``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import evaluation, models, routing
from modkd_jax.data import batching, merged_stream
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.methods.kit import norm_of
from modkd_jax.methods.split_backbone_net import GROUPS, SplitBackbone, all_probs, backbone_of, build, layer_list
from modkd_jax.methods.split_backbone_step import make_gate, make_optimizer, make_train_step, task_batches, train_online

PyTree = Any
RULES = ("til", "cil", "cil_top2_entropy", "task_id", "task_id_top2_entropy")


# ----------------------------------------------------------------------------- evaluation


def make_counts(net: SplitBackbone, temperature: float = 1.0) -> Callable:
    """``counts(params, stats, x_u8, y, valid, true_task, seen) -> correct counts per rule`` (``evaluation``), jitted.

    Rules (``RULES``): ``til`` (true task's head), ``cil`` / ``cil_top2_entropy`` (head
    chosen by max-probability / lowest entropy of the two most confident, among
    the first ``seen``), ``task_id`` / ``task_id_top2_entropy`` (the chosen head is the
    true task's).
    """
    mean, std = jnp.asarray(net.mean), jnp.asarray(net.std)

    @jax.jit
    def counts(params, stats, x, y, valid, true_task, seen):
        probs = all_probs(net, params, stats, batching.to_float(x, mean, std), temperature)
        preds = routing.predictions(probs, true_task, seen)
        out = {rule: jnp.sum(valid & (t == true_task) & (c == y)) for rule, (t, c) in preds.items()}
        out["task_id"] = jnp.sum(valid & (preds["cil"][0] == true_task))
        out["task_id_top2_entropy"] = jnp.sum(valid & (preds["cil_top2_entropy"][0] == true_task))
        return out

    return counts


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class OCLConfig:
    """One online run: the budget split, batch size, per-group learning rates, stem, evaluation."""

    split: str = "6.5-2.3-2.4"  # F-S-T in millions (or explicit groups, see ``build``)
    batch_size: int = 64
    lr_task: float = 0.01
    lr_shared: float = 0.001
    optimizer: str = "sgd"
    momentum: float = 0.9
    stem_mode: str = "no_pool"
    temperature: float = 1.0  # softmax temperature of the task-ID rules
    eval_batch: int = 256
    eval_split: str = "test"  # where accuracies are measured: "test" or "val"

    def __post_init__(self):
        if min(self.batch_size, self.eval_batch) < 1:
            raise ValueError("batch_size and eval_batch must be at least 1")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {self.eval_split!r}")


@dataclasses.dataclass(frozen=True)
class Online:
    """Everything static about a run: the split network, its optimizer, compiled steps and counts. Build once."""

    cfg: OCLConfig
    scenario: Any
    net: SplitBackbone
    init: tuple[PyTree, PyTree] | None
    tx: Any
    steps: dict[str, Callable]  # "task": one task's batches (Setting 1); "mixed": the merged stream (Setting 2)
    gate: Callable
    counts: Callable

    @property
    def splits(self):
        return [getattr(task, self.cfg.eval_split) for task in self.scenario.tasks]


def setup(cfg: OCLConfig, scenario, init: tuple[PyTree, PyTree] | None = None) -> Online:
    """The split network of ``cfg.split`` on ``scenario`` (every copy from ``init``, or random), steps, counts.

    Args:
      cfg: the run's settings (budget split, learning rates, stem, evaluation).
      scenario: the tasks (a ``Scenario``), one class block of the head per task.
      init: backbone weights, a plain ResNet-18 ``(params, batch_stats)`` (its classifier is ignored);
        None: a random initialisation.
    """
    net = _net(cfg, scenario, init, jax.random.key(0))[0]
    tx = make_optimizer(net, cfg.lr_shared, cfg.lr_task, cfg.optimizer, cfg.momentum)
    return Online(cfg, scenario, net, init, tx, {"task": make_train_step(net, tx), "mixed": make_train_step(
        net, tx, mixed=True)}, make_gate(net), make_counts(net, cfg.temperature))


def _net(cfg: OCLConfig, scenario, init, key):
    mean, std = norm_of(scenario)
    return build(cfg.split, scenario.block_sizes, key, init=init, stem_mode=cfg.stem_mode, mean=mean, std=std,
                 input_shape=scenario.input_shape)


def init_state(m: Online, key: jax.Array) -> dict:
    """``{"params", "batch_stats"}`` before any task: every task copy the initial backbone, heads from ``key``."""
    _, params, stats = _net(m.cfg, m.scenario, m.init, key)
    return {"params": params, "batch_stats": stats}


def learn_task(m: Online, state: dict, t: int, key: jax.Array, *, log: Callable[[dict], None] | None = None,
               progress: bool = False) -> tuple[dict, dict]:
    """Setting 1: one pass over task ``t``'s training split (order from ``key``), a fresh optimizer state.

    Only task ``t``'s copy and the shared group train (``optim.gated``); what
    carries to the next task is the weights and BN statistics (the state).
    """
    task, bs = m.scenario.tasks[t], m.cfg.batch_size
    n = len(task.train.y)
    carry = (state["params"], state["batch_stats"], m.tx.init(state["params"]))
    carry, metrics = train_online(m.steps["task"], m.gate, carry, task_batches(task.train, t, bs, key), bs,
                                  total=-(-n // bs), desc=f"task {t + 1}/{m.scenario.task_count} {task.name}",
                                  progress=progress)
    if log is not None:
        log({"task": t, "phase": "online", **metrics})
    return {"params": carry[0], "batch_stats": carry[1]}, {"task": t, "name": task.name, "examples": n, **metrics}


def evaluate(m: Online, state: dict, seen: int) -> dict[str, np.ndarray]:
    """Accuracy of every rule on each task's evaluation split: ``{rule: (task_count,)}`` (``evaluation.accuracies``)."""
    accs = evaluation.accuracies(m.counts, (state["params"], state["batch_stats"]), m.splits, seen, m.cfg.eval_batch)
    return {rule: accs[rule] for rule in RULES}


def groups_report(net: SplitBackbone) -> dict:
    """``{group: {"params": count (one task copy), "layers": [names]}}``."""
    return {g: {"params": net.sizes()[g], "layers": [layer.name for layer in net.layers_of(g)]} for g in GROUPS}


def param_counts(m: Online, state: dict) -> dict:
    return {"total": models.param_count(state["params"]), **{f"{g}_per_copy" if g == "task" else g: n
                                                             for g, n in m.net.sizes().items()}}


def learner(cfg: OCLConfig, scenario, init: tuple[PyTree, PyTree] | None = None) -> Learner:
    """Setting 1 (datasets in sequence, one pass each, task known at training) as a ``Learner``.

    ``R[rule][i, j]`` = accuracy on task j after task i; Val1 (right after task i)
    is ``R["til"][i, i]``, Val2 (after all) ``R["til"][-1, i]``.

    Args:
      cfg: the run's settings (see ``setup``).
      scenario: the tasks (a ``Scenario``).
      init: backbone weights ``(params, batch_stats)`` of a plain ResNet-18, or None (random).
    """
    m = setup(cfg, scenario, init)
    return Learner(name="split_backbone", rules=RULES, init_state=lambda key: init_state(m, key),
                   learn_task=lambda state, t, key, **kw: learn_task(m, state, t, key, **kw),
                   evaluate=lambda state, seen: evaluate(m, state, seen),
                   param_counts=lambda state: param_counts(m, state),
                   report=lambda state, infos: {"split": cfg.split, "batch_size": cfg.batch_size,
                                                "groups": groups_report(m.net)},
                   describe=lambda info: f"loss {info['loss']:.3f}  train acc {100 * info['acc']:.1f}%",
                   **scenario_fields(scenario))


def setting2(m: Online, key: jax.Array, seed: int, *, log: Callable[[dict], None] | None = None,
             progress: bool = False) -> tuple[dict, dict[str, np.ndarray], dict]:
    """Batches drawn at random from the merged pool of all tasks (order from ``seed``), one pass.

    Starts from ``init_state(m, key)`` (the state Setting 1 starts from with the
    same key); the same step factory and evaluator as Setting 1, the step in
    its mixed form. Returns the state, the per-task accuracy of every rule after
    the stream, and a summary. The task is unknown at test time: ``cil`` picks
    the head by max-probability, ``task_id`` is how often that pick is right.
    """
    state = init_state(m, key)
    bs, scenario = m.cfg.batch_size, m.scenario
    n = sum(len(t.train.y) for t in scenario.tasks)
    carry = (state["params"], state["batch_stats"], m.tx.init(state["params"]))
    carry, metrics = train_online(m.steps["mixed"], m.gate, carry, merged_stream(scenario, bs, seed), bs,
                                  total=-(-n // bs), desc="merged stream", progress=progress)
    state = {"params": carry[0], "batch_stats": carry[1]}
    accs = evaluate(m, state, scenario.task_count)
    info = {"examples": n, **metrics}
    if log is not None:
        log({"phase": "merged_stream", **info, **{r: accs[r] for r in RULES}})
    return state, accs, info


def pretrain(params: PyTree, stats: PyTree, split, num_classes: int, *, epochs: int, batch_size: int, lr: float,
             key: jax.Array, stem_mode: str, mean, std, progress: bool = False,
             log: Callable[[dict], None] | None = None) -> tuple[dict, dict]:
    """Train every layer of a ResNet-18 ``(params, stats)`` on a source split for ``epochs`` (Adam); returns the tree.

    Used so that frozen layers hold real features; the source head is discarded afterwards.
    """
    k_init, key = jax.random.split(key)
    layers_ = layer_list(params)
    groups = ("shared",) * (len(layers_) - 1) + ("task",)
    net, gp, gs = build(groups, (num_classes,), k_init, init=(params, stats), stem_mode=stem_mode, mean=mean, std=std,
                        input_shape=split.x.shape[1:])
    tx = make_optimizer(net, lr, lr, "adam")
    step, gate = make_train_step(net, tx), make_gate(net)
    carry = (gp, gs, tx.init(gp))
    n = len(split.y)
    batch_size = min(batch_size, n)
    for epoch in range(epochs):
        batches = ((x, y, t) for x, y, t in task_batches(split, 0, batch_size, jax.random.fold_in(key, epoch))
                   if len(y) == batch_size)  # full batches only: BN statistics of a tiny last batch are noisy
        carry, m = train_online(step, gate, carry, batches, batch_size, total=n // batch_size,
                                desc=f"pretrain epoch {epoch + 1}/{epochs}", progress=progress)
        if log is not None:
            log({"pretrain_epoch": epoch, **m})
    return backbone_of(net, carry[0], carry[1], 0)
