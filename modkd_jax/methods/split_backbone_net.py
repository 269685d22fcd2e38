"""The split ResNet-18 of ``methods.split_backbone``: its layers, the budget that cuts them into frozen, shared and
per-task groups, the parameter trees of every task copy and the forward pass of one or every task."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import losses, models
from modkd_jax.models import layers, resnet

PyTree = Any
GROUPS = ("frozen", "shared", "task")
STEM_MODES = {k: (stride, pool) for k, (size, stride, pool) in resnet.STEMS.items() if size == 7}  # (stride, pool)


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


def path_names(path) -> list[str]:
    """The keys of a pytree path, as strings."""
    return [getattr(k, "key", str(k)) for k in path]


def group_labels(net: SplitBackbone, tree: PyTree) -> PyTree:
    """The group of every leaf of a params or batch_stats tree (``optim.per_group`` labels)."""
    plan = net.plan
    return jax.tree_util.tree_map_with_path(lambda p, _: plan["/".join(path_names(p)[:-1])], tree)


def by_group(net: SplitBackbone, tree: PyTree) -> dict[str, dict[str, jax.Array]]:
    """``{group: {"stage3_block1/conv1/kernel": leaf, ...}}``: the leaves of each group by path."""
    out: dict = {g: {} for g in GROUPS}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), g in zip(flat, jax.tree.leaves(group_labels(net, tree))):
        out[g]["/".join(path_names(path))] = leaf
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
        names = path_names(path)
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
        names = path_names(path)
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
