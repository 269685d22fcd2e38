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
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from modkd_jax import evaluation, losses, models, optim, routing, training
from modkd_jax.data import batching, merged_stream
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.models import layers, resnet

PyTree = Any
GROUPS = ("frozen", "shared", "task")
STEM_MODES = {k: (stride, pool) for k, (size, stride, pool) in resnet.STEMS.items() if size == 7}  # (stride, pool)
RULES = ("til", "cil", "cil_entropy", "task_id", "task_id_entropy")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of the split: a conv + its batch norm (stem, proj, conv1, conv2) or the head."""

    name: str  # "stem", "stage1_block0.proj", ..., "head"
    kind: str  # "stem" | "proj" | "conv1" | "conv2" | "head"
    modules: tuple[str, ...]  # its module paths in the ResNet tree, e.g. ("stage1_block0/proj", ".../bn_proj")
    size: int  # number of parameters (kernel + BN scale/bias, or head kernel + bias)


@dataclasses.dataclass(frozen=True)
class SplitBackbone:
    """The static description of a split network: its layers, their groups, the tasks and the input."""

    layers: tuple[Layer, ...]
    groups: tuple[str, ...]  # group of each layer, non-decreasing in GROUPS order
    block_sizes: tuple[int, ...]  # classes of each task
    stem_mode: str = "no_pool"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    bn_momentum: float = 0.9

    @property
    def num_tasks(self) -> int:
        """Number of task copies (one per task)."""
        return len(self.block_sizes)

    @property
    def head_width(self) -> int:
        """Outputs of every head: the largest class count."""
        return max(self.block_sizes)

    @property
    def plan(self) -> dict[str, str]:
        """The group of every module path (``"stage3_block1/conv1"`` -> ``"shared"``)."""
        return {m: g for layer, g in zip(self.layers, self.groups) for m in layer.modules}

    @property
    def model(self) -> resnet.ResNet:
        """The ResNet-18 of every task (class block ``t`` of the classifier is task t's head)."""
        plan = tuple(self.plan.items())
        return models.resnet18(self.head_width * self.num_tasks, self.num_tasks, stem=self.stem_mode,
                               conv_impl="auto", conv=functools.partial(_conv_for, plan, self.num_tasks),
                               norm=functools.partial(_norm_for, plan, self.bn_momentum))

    def layers_of(self, group: str) -> tuple[Layer, ...]:
        """The layers of ``group`` in forward order."""
        return tuple(layer for layer, g in zip(self.layers, self.groups) if g == group)

    def sizes(self) -> dict[str, int]:
        """Parameters per group (the task group counted once: one copy)."""
        return {g: sum(layer.size for layer in self.layers_of(g)) for g in GROUPS}

    def class_valid(self) -> np.ndarray:
        """``(num_tasks, head_width)`` bools: which head outputs are real classes of each task."""
        return np.arange(self.head_width)[None, :] < np.asarray(self.block_sizes)[:, None]


def _conv_for(plan: tuple, num_tasks: int, path: str):
    """Conv constructor of ``path``: per-task kernels in the task group."""
    return functools.partial(layers.Conv, num_tasks=num_tasks) if dict(plan)[path] == "task" else layers.Conv


def _norm_for(plan: tuple, momentum: float, path: str):
    """Batch norm of ``path``: frozen (eval mode, one row), shared (per-task statistics only) or per task."""
    group = dict(plan)[path]
    if group == "frozen":
        return lambda num_tasks, name: layers.TaskBatchNorm(1, momentum, use_running_average=True, name=name)
    return functools.partial(layers.TaskBatchNorm, momentum=momentum, param_rows=1 if group == "shared" else None)


# ----------------------------------------------------------------------------- layers and budget


def layer_list(params: PyTree) -> tuple[Layer, ...]:
    """The layers of a ``models.resnet18`` parameter tree, in forward order, with their sizes."""
    size = lambda *trees: int(sum(x.size for t in trees for x in jax.tree.leaves(t)))  # noqa: E731
    layers_ = [Layer("stem", "stem", ("stem", "bn_stem"), size(params["stem"], params["bn_stem"]))]
    blocks = sorted((k for k in params if k.startswith("stage")),
                    key=lambda k: tuple(int(n) for n in re.findall(r"\d+", k)))
    for blk in blocks:
        p = params[blk]
        for kind, conv, bn in (("proj", "proj", "bn_proj"), ("conv1", "conv1", "bn1"), ("conv2", "conv2", "bn2")):
            if conv in p:
                layers_.append(Layer(f"{blk}.{kind}", kind, (f"{blk}/{conv}", f"{blk}/{bn}"), size(p[conv], p[bn])))
    layers_.append(Layer("head", "head", ("classifier",), size(params["classifier"])))
    return tuple(layers_)


def parse_budget(text: str) -> tuple[float, float, float]:
    """``"6.5-2.3-2.4"`` -> ``(6.5, 2.3, 2.4)`` millions (frozen, shared, task-specific)."""
    parts = str(text).split("-")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"split {text!r} is not F-S-T in millions of parameters, e.g. 6.5-2.3-2.4")
    return values  # type: ignore[return-value]


def resolve_budget(budget: str | tuple[float, float, float], layers: tuple[Layer, ...],
                   tolerance: float = 0.1) -> tuple[str, ...]:
    """The group of each layer for a budget "F-S-T" (millions).

    Rule: the frozen/shared boundary is the layer boundary whose cumulative
    count is nearest to F, the shared/task boundary the one (not before it)
    nearest to F+S; the head is always task-specific. F+S+T must be within
    ``tolerance`` (relative) of the network's size.
    """
    f, s, t = parse_budget(budget) if isinstance(budget, str) else budget
    total = sum(layer.size for layer in layers)
    if abs((f + s + t) * 1e6 - total) > tolerance * total:
        raise ValueError(f"split {f:g}-{s:g}-{t:g} sums to {f + s + t:g}M but the network has "
                         f"{total / 1e6:.3f}M parameters")
    cum = np.concatenate([[0], np.cumsum([layer.size for layer in layers[:-1]])])  # boundary k: before layer k
    b1 = int(np.argmin(np.abs(cum - f * 1e6)))
    b2 = b1 + int(np.argmin(np.abs(cum[b1:] - (f + s) * 1e6)))
    return tuple("frozen" if k < b1 else "shared" if k < b2 else "task" for k in range(len(layers)))


def describe(net: SplitBackbone) -> str:
    """One line per group: its layers (first .. last) and actual millions of parameters."""
    lines = []
    for g in GROUPS:
        ls = net.layers_of(g)
        span = "(none)" if not ls else ls[0].name if len(ls) == 1 else f"{ls[0].name} .. {ls[-1].name}"
        copies = f" per task, x{net.num_tasks} copies" if g == "task" else ""
        lines.append(f"  {g:<6} {net.sizes()[g] / 1e6:7.3f}M{copies}: {span} ({len(ls)} layers)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parameter trees


def _names(path) -> list[str]:
    return [getattr(k, "key", str(k)) for k in path]


def group_labels(net: SplitBackbone, tree: PyTree) -> PyTree:
    """The group of every leaf of a params or batch_stats tree (``optim.per_group`` labels)."""
    plan = net.plan
    return jax.tree_util.tree_map_with_path(lambda p, _: plan["/".join(_names(p)[:-1])], tree)


def by_group(net: SplitBackbone, tree: PyTree) -> dict[str, dict[str, jax.Array]]:
    """``{group: {"stage3_block1/conv1/kernel": leaf, ...}}``: the leaves of each group by path."""
    out: dict = {g: {} for g in GROUPS}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), g in zip(flat, jax.tree.leaves(group_labels(net, tree))):
        out[g]["/".join(_names(path))] = leaf
    return out


def reference_model(head_width: int):
    """The plain ``models.resnet18`` (one task, ImageNet stem) whose tree backbone weights come in."""
    return models.resnet18(head_width, num_tasks=1, stem="imagenet")


def random_init(head_width: int, key: jax.Array, input_shape=(32, 32, 3)) -> tuple[dict, dict]:
    """``(params, batch_stats)`` of a freshly initialised ResNet-18 (the model's own initialisers)."""
    return _init_fn(int(head_width), tuple(int(s) for s in input_shape))(key)


@functools.lru_cache(maxsize=None)
def _init_fn(head_width: int, input_shape: tuple[int, ...]) -> Callable:
    """The jitted initialiser, compiled once per head width and input shape."""
    model = reference_model(head_width)
    return jax.jit(lambda k: models.init(model, k, input_shape))


def layers_for(head_width: int) -> tuple[Layer, ...]:
    """The layer list of the ResNet-18 with ``head_width`` outputs, from shapes only (nothing computed)."""
    params, _ = jax.eval_shape(lambda: random_init(head_width, jax.random.key(0)))
    return layer_list(params)


def check_backbone(params: PyTree, stats: PyTree, like: tuple[PyTree, PyTree]) -> None:
    """Raise ValueError unless ``params``/``stats`` match ``like``'s tree and shapes (classifier excepted)."""
    def shapes(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            out.update(shapes(v, name) if isinstance(v, Mapping) else {name: tuple(v.shape)})
        return out

    for name, got, want in (("params", params, like[0]), ("batch_stats", stats, like[1])):
        g = {k: v for k, v in shapes(got).items() if not k.startswith("classifier/")}
        w = {k: v for k, v in shapes(want).items() if not k.startswith("classifier/")}
        missing, extra = sorted(set(w) - set(g)), sorted(set(g) - set(w))
        if missing or extra:
            what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(extra[:3])}"
            raise ValueError(f"backbone weights do not match ResNet-18: {name} {what}")
        for k in w:
            if g[k] != w[k]:
                raise ValueError(f"backbone weights do not match ResNet-18: {name}/{k} has shape {g[k]}, "
                                 f"expected {w[k]}")


def _expand(net: SplitBackbone, params: PyTree, stats: PyTree) -> tuple[dict, dict]:
    """A one-task ResNet-18 tree -> the split tree: every per-task row (and head block) a copy of it."""
    T, plan = net.num_tasks, net.plan

    def grow(path, a, stat):
        names = _names(path)
        g = plan["/".join(names[:-1])]
        if names[0] == "classifier":
            return jnp.tile(a, (1, T) if a.ndim == 2 else (T,))
        if g == "task" and names[-1] == "kernel":
            return jnp.repeat(a[None], T, axis=0)
        return jnp.repeat(a, T, axis=0) if g == "task" or (stat and g == "shared") else jnp.asarray(a)

    return (jax.tree_util.tree_map_with_path(lambda p, a: grow(p, a, False), params),
            jax.tree_util.tree_map_with_path(lambda p, a: grow(p, a, True), stats))


def backbone_of(net: SplitBackbone, params: dict, stats: dict, task: int = 0) -> tuple[dict, dict]:
    """Task ``task``'s network as a plain ResNet-18 ``(params, batch_stats)`` (e.g. for ``convert.save_npz``)."""
    K, plan = net.head_width, net.plan

    def pick(path, a, stat):
        names = _names(path)
        g = plan["/".join(names[:-1])]
        if names[0] == "classifier":
            return a[..., task * K:(task + 1) * K]
        if g == "task" and names[-1] == "kernel":
            return a[task]
        return a[task:task + 1] if a.shape[0] > 1 and (g == "task" or (stat and g == "shared")) else a

    return (jax.tree_util.tree_map_with_path(lambda p, a: pick(p, a, False), params),
            jax.tree_util.tree_map_with_path(lambda p, a: pick(p, a, True), stats))


def build(groups_or_budget, block_sizes: tuple[int, ...], key: jax.Array, *, init: tuple[PyTree, PyTree] | None = None,
          stem_mode: str = "no_pool", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_shape=(32, 32, 3),
          bn_momentum: float = 0.9) -> tuple[SplitBackbone, dict, dict]:
    """``(net, params, stats)``: the split network, every task copy starting from the same weights.

    Args:
        groups_or_budget: an "F-S-T" budget (text or three floats) or an explicit group per layer.
        block_sizes: classes of each task.
        key: PRNG key of the random initialisation.
        init: backbone weights, a plain ResNet-18 ``(params, batch_stats)``; its classifier is ignored.
        stem_mode: one of ``STEM_MODES``.
        mean: per-channel input mean of the standardisation.
        std: per-channel input standard deviation.
        input_shape: ``(H, W, C)`` of the inputs.
        bn_momentum: running-statistics momentum.
    """
    if stem_mode not in STEM_MODES:
        raise ValueError(f"unknown stem mode {stem_mode!r}; choose one of {', '.join(STEM_MODES)}")
    block_sizes = tuple(int(b) for b in block_sizes)
    if not block_sizes or min(block_sizes) < 1:
        raise ValueError(f"need at least one task with at least one class, got {block_sizes}")
    params, stats = random_init(max(block_sizes), key, input_shape)
    if init is not None:
        check_backbone(*init, (params, stats))
        copy = lambda a: jnp.array(a, jnp.float32, copy=True)  # noqa: E731  (steps donate their inputs)
        params = {**jax.tree.map(copy, {k: v for k, v in init[0].items() if k != "classifier"}),
                  "classifier": params["classifier"]}
        stats = jax.tree.map(copy, init[1])
    layers_ = layer_list(params)
    if isinstance(groups_or_budget, str) or not isinstance(groups_or_budget[0], str):
        groups = resolve_budget(groups_or_budget, layers_)
    else:
        groups = tuple(groups_or_budget)
    if len(groups) != len(layers_) or groups[-1] != "task" or \
            [GROUPS.index(g) for g in groups] != sorted(GROUPS.index(g) for g in groups):
        raise ValueError("groups must be frozen* shared* task+ in forward order, ending with the head")
    net = SplitBackbone(layers_, groups, block_sizes, stem_mode, tuple(float(m) for m in mean),
                        tuple(float(s) for s in std), bn_momentum)
    return (net, *_expand(net, params, stats))


# ----------------------------------------------------------------------------- forward pass


def apply(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array, task, train: bool = False,
          weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Task ``task``'s masked logits on standardised inputs and the new statistics (``stats`` in eval mode)."""
    variables = {"params": params, "batch_stats": stats}
    if train:
        out, new = net.model.apply(variables, xf, task, True, weights, mutable=["batch_stats"])
        new = new["batch_stats"]
    else:
        out, new = net.model.apply(variables, xf, task, False), stats
    logits = out.reshape(out.shape[0], net.num_tasks, net.head_width)[:, task]
    return losses.masked_logits(logits, jnp.asarray(net.class_valid())[task]), new


def apply_all(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array, train: bool = False,
              weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Every task's masked logits ``(T, B, head_width)`` and new statistics (row t moved by task t's branch).

    ``weights`` is ``(T, B)``: the examples of each task's batch statistics.
    """
    T = net.num_tasks
    ws = jnp.ones((T, xf.shape[0])) if weights is None else weights
    logits, new = jax.vmap(lambda t, w: apply(net, params, stats, xf, t, train, w))(jnp.arange(T), ws)
    diag = lambda a: a[jnp.arange(T), jnp.arange(T)] if a.shape[1] == T else a[0]  # noqa: E731
    return logits, jax.tree.map(diag, new)


def forward(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array, task, train: bool = False) -> jax.Array:
    """Logits of task ``task``'s network on standardised inputs (no state update)."""
    return apply(net, params, stats, xf, task, train)[0]


def all_probs(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Eval-mode probabilities of every task's network: ``(num_tasks, B, head_width)``, 0 on padded classes."""
    return jax.nn.softmax(apply_all(net, params, stats, xf)[0] / temperature, axis=-1)


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(net: SplitBackbone, lr_shared: float, lr_task: float, optimizer: str = "sgd",
                   momentum: float = 0.9):
    """``optim.gated(optim.per_group_lr({"frozen": None, "shared": lr_shared, "task": lr_task}))``.

    Args:
        net: the split network (its plan labels every parameter).
        lr_shared: learning rate of the shared group.
        lr_task: learning rate of the task group.
        optimizer: "sgd" or "adam".
        momentum: SGD momentum (0: none).
    """
    if optimizer == "sgd":
        make = lambda lr: optax.sgd(lr, momentum=momentum or None)  # noqa: E731
    elif optimizer == "adam":
        make = optax.adam
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    return optim.gated(optim.per_group_lr({"frozen": None, "shared": lr_shared, "task": lr_task},
                                          functools.partial(group_labels, net), make=make))


def train_mask(net: SplitBackbone, params: dict, rows) -> dict:
    """Gate: frozen never, shared always, task rows (and head blocks) only where ``rows`` (bool per task).

    Leaves broadcast against their parameter (scalars, ``(T, 1, ...)`` rows, the head's ``(T * K,)``).
    """
    K = net.head_width
    rows = jnp.asarray(rows, bool)

    def mask(path, a, g):
        if g != "task":
            return jnp.asarray(g == "shared")
        if _names(path)[0] == "classifier":
            return jnp.repeat(rows, K)
        return rows.reshape((-1,) + (1,) * (a.ndim - 1))

    return jax.tree_util.tree_map_with_path(mask, params, group_labels(net, params))


class StreamBatch(NamedTuple):
    """One online batch: uint8 (or standardised) images, task-local labels, task ids, real-example flags."""

    x: jax.Array
    y: jax.Array
    task: jax.Array  # int32: a scalar (Setting 1) or one per example (Setting 2)
    valid: jax.Array  # bool per example (the last batch is zero-padded)


class Context(NamedTuple):
    """What ``training.make_step`` needs besides the batch: the gate of ``optim.gated``."""

    trainable: PyTree


def _weighted_ce(logits: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


def make_loss(net: SplitBackbone, mixed: bool = False) -> Callable:
    """The weighted cross-entropy of ``training.make_step``: ``(params, stats, batch, ctx) -> (loss, (stats, m))``.

    ``mixed=False``: the batch is one task's (``batch.task`` a scalar), only that
    task's network runs. ``mixed=True`` (Setting 2): every task's network runs on
    the batch, its loss and BN statistics restricted to its own examples; the
    shared weights get the sum of their gradients. Frozen parameters are
    constants (no gradient is computed through them).
    """
    T = net.num_tasks

    def loss_fn(params, stats, batch: StreamBatch, ctx: Context):
        del ctx
        params = jax.tree.map(lambda a, g: jax.lax.stop_gradient(a) if g == "frozen" else a, params,
                              group_labels(net, params))
        w = batch.valid.astype(jnp.float32)
        if not mixed:
            logits, new = apply(net, params, stats, batch.x, batch.task, True, w)
        else:
            ws = w[None, :] * (batch.task[None, :] == jnp.arange(T)[:, None])
            all_logits, new = apply_all(net, params, stats, batch.x, True, ws)
            logits = all_logits[batch.task, jnp.arange(len(batch.y))]
        loss = _weighted_ce(logits, batch.y, w)
        acc = jnp.sum(w * (jnp.argmax(logits, -1) == batch.y)) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, (new, {"acc": acc})

    return loss_fn


def make_train_step(net: SplitBackbone, tx, mixed: bool = False) -> Callable:
    """``step(carry=(params, stats, opt_state), batch: StreamBatch, key, ctx: Context)``: ``training.make_step``.

    The batch's uint8 images are standardised outside the gradient; ``ctx.trainable``
    (``train_mask``) gates the optimizer.
    """
    mean, std = jnp.asarray(net.mean), jnp.asarray(net.std)
    prepare = lambda batch, key, ctx: batch._replace(x=batching.to_float(batch.x, mean, std))  # noqa: E731
    return training.make_step(make_loss(net, mixed), tx, prepare)


def task_batches(split, task: int, batch_size: int, key: jax.Array) -> Iterator[tuple]:
    """One shuffled pass over one task's split: ``(x, y, task)`` host batches (Setting 1)."""
    order = np.asarray(jax.random.permutation(key, len(split.y)))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield split.x[idx], split.y[idx], task


def make_gate(net: SplitBackbone) -> Callable:
    """``gate(params, task, valid) -> Context``: the task copies with real examples in the batch train.

    The mask depends only on which tasks are present (``params`` give its structure), so it is built
    once per pattern of tasks and reused: one per task in setting 1, a few in the merged stream.
    """
    T = net.num_tasks
    mask = jax.jit(functools.partial(train_mask, net))
    built: dict[bytes, Context] = {}

    def gate(params, task, valid) -> Context:
        task = np.asarray(task)
        if task.ndim:
            rows = np.any((task[None, :] == np.arange(T)[:, None]) & np.asarray(valid)[None, :], axis=1)
        else:
            rows = np.arange(T) == task
        if rows.tobytes() not in built:
            built[rows.tobytes()] = Context(mask(params, rows))
        return built[rows.tobytes()]

    return gate


def train_online(step: Callable, gate: Callable, carry, batches: Iterable[tuple], batch_size: int, *,
                 total: int | None = None, desc: str = "", progress: bool = False):
    """One pass of ``step`` over host batches ``(x, y, task)``, each example seen once: carry, mean metrics.

    Every batch is zero-padded to ``batch_size`` (``evaluation.pad_batches``: one
    compiled shape); ``gate`` (``make_gate``) opens the task copies present in it.
    """
    sums, count = None, 0
    key = jax.random.key(0)  # unused: no augmentation
    for x, y, task in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
        x, y, valid = next(evaluation.pad_batches(np.asarray(x), np.asarray(y), batch_size))
        task = np.asarray(task, np.int32)
        if task.ndim:  # one task id per example: padded like the labels
            task = np.concatenate([task, np.zeros(batch_size - len(task), np.int32)])
        ctx = gate(carry[0], task, valid)
        carry, m = step(carry, StreamBatch(x, y, jnp.asarray(task), valid), key, ctx)
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        count += 1
    means = {k: float(v) / count for k, v in sums.items()} if count else {}
    return carry, {**means, "steps": count}


# ----------------------------------------------------------------------------- evaluation


def make_counts(net: SplitBackbone, temperature: float = 1.0) -> Callable:
    """``counts(params, stats, x_u8, y, valid, true_task, seen) -> correct counts per rule`` (``evaluation``), jitted.

    Rules (``RULES``): ``til`` (true task's head), ``cil`` / ``cil_entropy`` (head
    chosen by max-probability / lowest entropy of the two most confident, among
    the first ``seen``), ``task_id`` / ``task_id_entropy`` (the chosen head is the
    true task's).
    """
    mean, std = jnp.asarray(net.mean), jnp.asarray(net.std)

    @jax.jit
    def counts(params, stats, x, y, valid, true_task, seen):
        probs = all_probs(net, params, stats, batching.to_float(x, mean, std), temperature)
        preds = routing.predictions(probs, true_task, seen)
        out = {rule: jnp.sum(valid & (t == true_task) & (c == y)) for rule, (t, c) in preds.items()}
        out["task_id"] = jnp.sum(valid & (preds["cil"][0] == true_task))
        out["task_id_entropy"] = jnp.sum(valid & (preds["cil_entropy"][0] == true_task))
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
    """The split network of ``cfg.split`` on ``scenario`` (every copy from ``init``, or random), steps, counts."""
    net = _net(cfg, scenario, init, jax.random.key(0))[0]
    tx = make_optimizer(net, cfg.lr_shared, cfg.lr_task, cfg.optimizer, cfg.momentum)
    return Online(cfg, scenario, net, init, tx, {"task": make_train_step(net, tx), "mixed": make_train_step(
        net, tx, mixed=True)}, make_gate(net), make_counts(net, cfg.temperature))


def _net(cfg: OCLConfig, scenario, init, key):
    return build(cfg.split, scenario.block_sizes, key, init=init, stem_mode=cfg.stem_mode,
                 mean=tuple(float(m) for m in scenario.norm[0]), std=tuple(float(s) for s in scenario.norm[1]),
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
