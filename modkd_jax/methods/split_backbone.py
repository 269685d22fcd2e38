"""Online continual learning with a split ResNet-18: frozen, shared and per-task layers (DESIGN §1.3).

The network is ``models.resnet18(K, num_tasks=1, stem="imagenet")`` (same
parameter tree, so torchvision weights load) seen as a list of *layers* in
forward order, each a convolution with its batch norm::

    stem, stage0_block0.conv1, stage0_block0.conv2, ..., stage1_block0.proj,
    stage1_block0.conv1, stage1_block0.conv2, ..., stage3_block1.conv2, head

A budget "F-S-T" (millions of parameters) cuts the list at two layer
boundaries (``resolve_budget``): the first layers are **frozen**, the middle
ones **shared** and trained with a small learning rate, the last ones (always
including the classifier head) are **copied per task** (a leading task axis on
their leaves) and trained with a high learning rate. Cutting between a
block's ``conv1`` and ``conv2`` is allowed; the residual of that block is then
added in the task-specific part. Learning rates go through
``optim.per_group_lr`` (frozen group: ``None``, i.e. ``-0.0`` updates) inside
``optim.gated``, whose mask also keeps every task copy but the one(s) being
trained bit-identical.

Batch norm: frozen layers run in eval mode with their stored statistics, which
never change (from ``--init``/pre-training, else the initial 0/1). Shared
layers share their weights and BN scale/bias, but keep running statistics
*per task* (a task axis on ``stats["shared"]``): with one set for all tasks,
MNIST's statistics were overwritten by Fashion-MNIST's and MNIST's
accuracy with its own layers fell from 83.7% to 74.3%, all of the forgetting
of the 6.5-2.3-2.4 split (restoring the shared weights alone: 74.4%; demo
subset of experiments/ocl.py, seed 0). Task
copies have their own BN parameters and statistics. Statistics move only with
their task's examples (in a mixed batch, weighted by task membership), so the
shared and task layers run once per task (the frozen ones once).

Small inputs: the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool)
takes 224 px images to 56 px. ``stem_mode`` keeps the 7x7 kernel (so
ImageNet weights still load) and adapts the rest: ``"imagenet"`` (unchanged;
32 px -> 8 px), ``"no_pool"`` (stride-2 conv, no max-pool; 32 px -> 16 px,
the default) or ``"stride1"`` (stride-1 conv, no max-pool; 32 px -> 32 px,
CIFAR-like resolution, ~4x the compute of ``no_pool``).

State: ``params = {"frozen", "shared", "task"}`` and the same for
``stats``, each a dict from layer name to that layer's leaves (``kernel``,
``scale``, ``bias`` / ``mean``, ``var``); ``params["task"]``,
``stats["shared"]`` and ``stats["task"]`` leaves carry the task axis. Each
head has ``max(block_sizes)`` outputs; logits past a task's class count are
masked.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from modkd_jax import losses, models, optim, routing
from modkd_jax.models import layers
from modkd_jax.data import batching, merged_stream

PyTree = Any
GROUPS = ("frozen", "shared", "task")
STEM_MODES = {"imagenet": (2, True), "no_pool": (2, False), "stride1": (1, False)}  # (conv stride, max-pool)
BN_EPS = 1e-5
RULES = ("til", "cil", "cil_entropy", "task_id", "task_id_entropy")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer of the split: a conv + its batch norm (stem, proj, conv1, conv2) or the head."""

    name: str  # "stem", "stage1_block0.proj", ..., "head"
    kind: str  # "stem" | "proj" | "conv1" | "conv2" | "head"
    stride: int
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

    def layers_of(self, group: str) -> tuple[Layer, ...]:
        """The layers of ``group`` in forward order."""
        return tuple(layer for layer, g in zip(self.layers, self.groups) if g == group)

    def sizes(self) -> dict[str, int]:
        """Parameters per group (the task group counted once: one copy)."""
        return {g: sum(layer.size for layer in self.layers_of(g)) for g in GROUPS}

    def class_valid(self) -> np.ndarray:
        """``(num_tasks, head_width)`` bools: which head outputs are real classes of each task."""
        return np.arange(self.head_width)[None, :] < np.asarray(self.block_sizes)[:, None]


# ----------------------------------------------------------------------------- layers and budget


def layer_list(params: PyTree) -> tuple[Layer, ...]:
    """The layers of a ``models.resnet18`` parameter tree, in forward order, with their sizes."""
    size = lambda *trees: int(sum(x.size for t in trees for x in jax.tree.leaves(t)))  # noqa: E731
    layers = [Layer("stem", "stem", 0, size(params["stem"], params["bn_stem"]))]
    blocks = sorted((k for k in params if k.startswith("stage")),
                    key=lambda k: tuple(int(n) for n in re.findall(r"\d+", k)))
    for blk in blocks:
        s, b = (int(n) for n in re.findall(r"\d+", blk))
        stride = 2 if (b == 0 and s > 0) else 1
        p = params[blk]
        if "proj" in p:
            layers.append(Layer(f"{blk}.proj", "proj", stride, size(p["proj"], p["bn_proj"])))
        layers.append(Layer(f"{blk}.conv1", "conv1", stride, size(p["conv1"], p["bn1"])))
        layers.append(Layer(f"{blk}.conv2", "conv2", 1, size(p["conv2"], p["bn2"])))
    layers.append(Layer("head", "head", 0, size(params["classifier"])))
    return tuple(layers)


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


def _bn_names(kind: str, blk: str) -> tuple[str, str]:
    """(conv module, BN module) names in the resnet18 tree for a conv layer."""
    if kind == "stem":
        return "stem", "bn_stem"
    return {"proj": (f"{blk}/proj", f"{blk}/bn_proj"), "conv1": (f"{blk}/conv1", f"{blk}/bn1"),
            "conv2": (f"{blk}/conv2", f"{blk}/bn2")}[kind]


def _get(tree: PyTree, path: str) -> PyTree:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def to_layers(params: PyTree, stats: PyTree, layers: tuple[Layer, ...]) -> tuple[dict, dict]:
    """Per-layer ``{name: {kernel, scale, bias}}`` and ``{name: {mean, var}}`` from a resnet18 tree."""
    lp, ls = {}, {}
    for layer in layers:
        if layer.kind == "head":
            lp[layer.name] = {"kernel": params["classifier"]["kernel"], "bias": params["classifier"]["bias"]}
            ls[layer.name] = {}
            continue
        conv, bn = _bn_names(layer.kind, layer.name.split(".")[0])
        p, s = _get(params, bn), _get(stats, bn)
        lp[layer.name] = {"kernel": _get(params, conv)["kernel"], "scale": p["scale"][0], "bias": p["bias"][0]}
        ls[layer.name] = {"mean": s["mean"][0], "var": s["var"][0]}
    return lp, ls


def from_layers(lp: dict, ls: dict, layers: tuple[Layer, ...]) -> tuple[dict, dict]:
    """The resnet18 ``(params, batch_stats)`` tree from per-layer dicts (inverse of ``to_layers``)."""
    params: dict = {}
    stats: dict = {}

    def put(tree, path, value):
        *parents, leaf = path.split("/")
        for k in parents:
            tree = tree.setdefault(k, {})
        tree[leaf] = value

    for layer in layers:
        p = lp[layer.name]
        if layer.kind == "head":
            put(params, "classifier/kernel", p["kernel"])
            put(params, "classifier/bias", p["bias"])
            continue
        conv, bn = _bn_names(layer.kind, layer.name.split(".")[0])
        put(params, f"{conv}/kernel", p["kernel"])
        put(params, f"{bn}/scale", p["scale"][None])
        put(params, f"{bn}/bias", p["bias"][None])
        put(stats, f"{bn}/mean", ls[layer.name]["mean"][None])
        put(stats, f"{bn}/var", ls[layer.name]["var"][None])
    return params, stats


def reference_model(head_width: int):
    """The ``models.resnet18`` whose parameter tree the split network uses."""
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


def build(groups_or_budget, block_sizes: tuple[int, ...], key: jax.Array, *, init: tuple[PyTree, PyTree] | None = None,
          stem_mode: str = "no_pool", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_shape=(32, 32, 3),
          bn_momentum: float = 0.9) -> tuple[SplitBackbone, dict, dict]:
    """``(net, params, stats)``: the split network, every task copy starting from the same weights.

    ``init`` gives backbone weights (a resnet18 tree; its classifier is ignored,
    heads always start from the random initialisation). ``groups_or_budget`` is
    an "F-S-T" budget or an explicit group per layer.
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
    layers = layer_list(params)
    if isinstance(groups_or_budget, str) or not isinstance(groups_or_budget[0], str):
        groups = resolve_budget(groups_or_budget, layers)
    else:
        groups = tuple(groups_or_budget)
    if len(groups) != len(layers) or groups[-1] != "task" or \
            [GROUPS.index(g) for g in groups] != sorted(GROUPS.index(g) for g in groups):
        raise ValueError("groups must be frozen* shared* task+ in forward order, ending with the head")
    net = SplitBackbone(layers, groups, block_sizes, stem_mode, tuple(float(m) for m in mean),
                        tuple(float(s) for s in std), bn_momentum)
    lp, ls = to_layers(params, stats, layers)
    T = net.num_tasks
    gp = {g: {layer.name: lp[layer.name] for layer in net.layers_of(g)} for g in GROUPS}
    gs = {g: {layer.name: ls[layer.name] for layer in net.layers_of(g)} for g in GROUPS}
    copy = lambda tree: jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a)[None], T, axis=0), tree)  # noqa: E731
    gp["task"], gs["task"], gs["shared"] = copy(gp["task"]), copy(gs["task"]), copy(gs["shared"])
    return net, gp, gs


def task_copy(tree: PyTree, task) -> PyTree:
    """Task ``task``'s slice of a task-group tree (``task`` may be traced)."""
    return jax.tree.map(lambda a: a[task], tree)


def backbone_of(net: SplitBackbone, params: dict, stats: dict, task: int = 0) -> tuple[dict, dict]:
    """The resnet18 ``(params, batch_stats)`` of one task's network (e.g. to save it with ``convert.save_npz``)."""
    lp = {**params["frozen"], **params["shared"], **task_copy(params["task"], task)}
    ls = {**stats["frozen"], **task_copy(stats["shared"], task), **task_copy(stats["task"], task)}
    return from_layers(lp, ls, net.layers)


# ----------------------------------------------------------------------------- forward pass


def _conv(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """NHWC x HWIO convolution with symmetric zero padding ``pad`` (PyTorch's arithmetic).

    On maps of at most 4x4 pixels the convolution is lowered as patches + one
    matmul (``layers.conv2d(impl="patches")``): XLA:CPU's convolution took 3.1 s
    for a 3x3 512->512 conv on 64 maps of 2x2 (forward) against 0.015 s this way
    (2 cores; the ``no_pool`` stem on 32 px inputs reaches 2x2 in stage 3).
    """
    kh, kw = kernel.shape[:2]
    small = min(x.shape[1], x.shape[2]) <= 4 and kh * kw > 1
    return layers.conv2d(x, kernel, stride, pad, impl="patches" if small else "xla")


def batch_norm(y: jax.Array, p: dict, s: dict, train: bool, weights: jax.Array | None, momentum: float):
    """``(normalised y, new running stats)``; in training the statistics are weighted by ``weights`` per example.

    Examples with weight 0 (padding, other tasks) do not enter the statistics;
    with no weighted example the running statistics stay bit-identical.
    """
    if not train:
        mean, var, new = s["mean"], s["var"], s
    else:
        w = jnp.ones(y.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
        wb = w[:, None, None, None]
        count = jnp.sum(w) * y.shape[1] * y.shape[2]
        denom = jnp.maximum(count, 1.0)
        mean = jnp.sum(wb * y, axis=(0, 1, 2)) / denom
        var = jnp.sum(wb * jnp.square(y - mean), axis=(0, 1, 2)) / denom
        seen = count > 0
        new = {"mean": jnp.where(seen, momentum * s["mean"] + (1 - momentum) * mean, s["mean"]),
               "var": jnp.where(seen, momentum * s["var"] + (1 - momentum) * var, s["var"])}
        new = jax.lax.stop_gradient(new)
    return (y - mean) * jax.lax.rsqrt(var + BN_EPS) * p["scale"] + p["bias"], new


def apply_layer(net: SplitBackbone, layer: Layer, p: dict, s: dict, state: dict, train: bool,
                weights: jax.Array | None) -> tuple[dict, dict]:
    """Run one layer on ``state`` ({"x": block input, "h": conv1 output, "sc": projection}): new state, stats."""
    if layer.kind == "head":
        feats = jnp.mean(state["x"], axis=(1, 2))
        return {"logits": feats @ p["kernel"] + p["bias"]}, s
    bn = lambda y: batch_norm(y, p, s, train, weights, net.bn_momentum)  # noqa: E731
    if layer.kind == "stem":
        stride, pool = STEM_MODES[net.stem_mode]
        y, new = bn(_conv(state["x"], p["kernel"], stride, 3))
        y = nn.relu(y)
        if pool:
            y = nn.max_pool(y, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        return {"x": y}, new
    if layer.kind == "proj":
        y, new = bn(_conv(state["x"], p["kernel"], layer.stride, 0))
        return {**state, "sc": y}, new
    if layer.kind == "conv1":
        y, new = bn(_conv(state["x"], p["kernel"], layer.stride, 1))
        return {**state, "h": nn.relu(y)}, new
    y, new = bn(_conv(state["h"], p["kernel"], 1, 1))  # conv2 closes the block
    return {"x": nn.relu(state.get("sc", state["x"]) + y)}, new


def run_layers(net: SplitBackbone, layers: Iterable[Layer], params: dict, stats: dict, state: dict, train: bool,
               weights: jax.Array | None = None) -> tuple[dict, dict]:
    """Run ``layers`` in order; returns the final state and every layer's new statistics."""
    new_stats = {}
    for layer in layers:
        state, new_stats[layer.name] = apply_layer(net, layer, params[layer.name], stats[layer.name], state,
                                                   train, weights)
    return state, new_stats


def trunk(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array) -> dict:
    """The frozen layers in eval mode (no gradient): the state every task's branch starts from."""
    state, _ = run_layers(net, net.layers_of("frozen"), jax.lax.stop_gradient(params["frozen"]), stats["frozen"],
                          {"x": xf}, False)
    return state


def branch(net: SplitBackbone, shared: dict, task_params: dict, stats_t: dict, state: dict, task, train: bool,
           weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Task ``task``'s shared layers (its BN statistics row) and task copy: masked logits and new statistics.

    ``stats_t`` is ``{"shared": ..., "task": ...}`` already sliced to the task.
    """
    state, sh = run_layers(net, net.layers_of("shared"), shared, stats_t["shared"], state, train, weights)
    out, tk = run_layers(net, net.layers_of("task"), task_params, stats_t["task"], state, train, weights)
    valid = jnp.asarray(net.class_valid())[task]
    return losses.masked_logits(out["logits"], valid), {"shared": sh, "task": tk}


def task_stats(stats: dict, task) -> dict:
    """The statistics rows of task ``task`` in the shared and task groups."""
    return {"shared": task_copy(stats["shared"], task), "task": task_copy(stats["task"], task)}


def forward(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array, task, train: bool = False) -> jax.Array:
    """Logits of task ``task``'s network on standardised inputs (no state update)."""
    state = trunk(net, params, stats, xf)
    logits, _ = branch(net, params["shared"], task_copy(params["task"], task), task_stats(stats, task), state, task,
                       train)
    return logits


def all_probs(net: SplitBackbone, params: dict, stats: dict, xf: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Eval-mode probabilities of every task's network: ``(num_tasks, B, head_width)``, 0 on padded classes.

    The frozen layers run once; shared and task layers once per task (``lax.map``).
    """
    state = trunk(net, params, stats, xf)

    def one(args):
        tp, st, t = args
        logits, _ = branch(net, params["shared"], tp, st, state, t, False)
        return jax.nn.softmax(logits / temperature, axis=-1)

    per_task = {"shared": stats["shared"], "task": stats["task"]}
    return jax.lax.map(one, (params["task"], per_task, jnp.arange(net.num_tasks)))


# ----------------------------------------------------------------------------- optimisation


def group_labels(params: dict) -> dict:
    """The group name of every leaf (``optim.per_group`` labels)."""
    return {g: jax.tree.map(lambda _: g, params[g]) for g in params}


def make_optimizer(lr_shared: float, lr_task: float, optimizer: str = "sgd", momentum: float = 0.9):
    """``optim.gated(optim.per_group_lr({"frozen": None, "shared": lr_shared, "task": lr_task}))``."""
    if optimizer == "sgd":
        make = lambda lr: optax.sgd(lr, momentum=momentum or None)  # noqa: E731
    elif optimizer == "adam":
        make = optax.adam
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    return optim.gated(optim.per_group_lr({"frozen": None, "shared": lr_shared, "task": lr_task}, group_labels,
                                          make=make))


def train_mask(params: dict, rows: jax.Array) -> dict:
    """Gate: frozen never, shared always, task copies only where ``rows`` (bool per task) is True."""
    row = lambda a: rows.reshape((-1,) + (1,) * (a.ndim - 1))  # noqa: E731
    return {"frozen": jax.tree.map(lambda _: jnp.zeros((), bool), params["frozen"]),
            "shared": jax.tree.map(lambda _: jnp.ones((), bool), params["shared"]),
            "task": jax.tree.map(row, params["task"])}


def _weighted_ce(logits: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


def make_train_step(net: SplitBackbone, tx, mixed: bool = False) -> Callable:
    """``step(carry=(params, stats, opt_state), x_u8, y, task, valid) -> (carry, metrics)``, jitted, carry donated.

    ``mixed=False``: the batch is one task's, ``task`` a scalar, only that
    task's branch (shared layers with its statistics, its copy) runs and
    trains. ``mixed=True``: ``task`` is per example (Setting 2), every task's
    branch runs on the batch with its loss and BN statistics restricted to its
    own examples; the shared weights get the sum of the branches' gradients.
    ``valid`` marks real examples (the last batch is padded).
    """
    mean, std = jnp.asarray(net.mean), jnp.asarray(net.std)
    T = net.num_tasks

    def step(carry, x, y, task, valid):
        params, stats, opt_state = carry
        xf = batching.to_float(x, mean, std)
        w = valid.astype(jnp.float32)
        state = trunk(net, params, stats, xf)
        per_task = {"shared": stats["shared"], "task": stats["task"]}

        def loss_fn(trainable):
            if not mixed:
                logits, new = branch(net, trainable["shared"], task_copy(trainable["task"], task),
                                     task_stats(stats, task), state, task, True, w)
            else:
                def one(args):
                    tp, st, t = args
                    return branch(net, trainable["shared"], tp, st, state, t, True, w * (task == t))

                all_logits, new = jax.lax.map(one, (trainable["task"], per_task, jnp.arange(T)))
                logits = all_logits[task, jnp.arange(len(y))]
            loss = _weighted_ce(logits, y, w)
            acc = jnp.sum(w * (jnp.argmax(logits, -1) == y)) / jnp.maximum(jnp.sum(w), 1.0)
            return loss, (new, acc)

        trainable = {"shared": params["shared"], "task": params["task"]}
        (loss, (new, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        grads = {"frozen": jax.tree.map(jnp.zeros_like, params["frozen"]), **g}
        if mixed:
            rows = jnp.any((task[None, :] == jnp.arange(T)[:, None]) & valid[None, :], axis=1)
        else:
            rows = jnp.arange(T) == task
            new = jax.tree.map(lambda a, n: a.at[task].set(n), per_task, new)
        updates, opt_state = tx.update(grads, opt_state, params, mask=train_mask(params, rows))
        params = optax.apply_updates(params, updates)
        stats = {"frozen": stats["frozen"], **new}
        return (params, stats, opt_state), {"loss": loss, "acc": acc}

    return jax.jit(step, donate_argnums=(0,))


def padded(x: np.ndarray, y: np.ndarray, task: np.ndarray | int, batch_size: int):
    """``(x, y, task, valid)`` with the batch zero-padded to ``batch_size`` (one compiled shape)."""
    n = len(y)
    valid = np.arange(batch_size) < n
    pad = batch_size - n
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        if not np.isscalar(task) and np.ndim(task):
            task = np.concatenate([task, np.zeros(pad, np.asarray(task).dtype)])
    return x, y, task, valid


def train_online(step: Callable, carry, batches: Iterable[tuple], batch_size: int, *, total: int | None = None,
                 desc: str = "", progress: bool = False):
    """One pass of ``step`` over ``batches`` of ``(x, y, task)``, each example seen once: carry, mean metrics."""
    sums, count = None, 0
    for x, y, task in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress):
        x, y, task, valid = padded(np.asarray(x), np.asarray(y), task, batch_size)
        task = jnp.asarray(task, jnp.int32)
        carry, m = step(carry, x, y, task, valid)
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        count += 1
    means = {k: float(v) / count for k, v in sums.items()} if count else {}
    return carry, {**means, "steps": count}


def task_batches(split, task: int, batch_size: int, key: jax.Array) -> Iterator[tuple]:
    """One shuffled pass over one task's split: ``(x, y, task)`` host batches (Setting 1)."""
    order = np.asarray(jax.random.permutation(key, len(split.y)))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield split.x[idx], split.y[idx], task


# ----------------------------------------------------------------------------- evaluation


def make_eval(net: SplitBackbone, temperature: float = 1.0) -> Callable:
    """``eval(params, stats, x_u8, y, valid, true_task, seen) -> correct counts per rule``, jitted.

    Rules: ``til`` (true task's head), ``cil`` / ``cil_entropy`` (head chosen by
    max-probability / lowest entropy of the two most confident, among the
    first ``seen``), ``task_id`` / ``task_id_entropy`` (the chosen head is the
    true task's).
    """
    mean, std = jnp.asarray(net.mean), jnp.asarray(net.std)

    @jax.jit
    def evaluate(params, stats, x, y, valid, true_task, seen):
        probs = all_probs(net, params, stats, batching.to_float(x, mean, std), temperature)
        preds = routing.predictions(probs, true_task, seen)
        out = {rule: jnp.sum(valid & (t == true_task) & (c == y)) for rule, (t, c) in preds.items()}
        out["task_id"] = jnp.sum(valid & (preds["cil"][0] == true_task))
        out["task_id_entropy"] = jnp.sum(valid & (preds["cil_entropy"][0] == true_task))
        return out

    return evaluate


def evaluate(evaluate_fn: Callable, params: dict, stats: dict, splits, seen: int,
             batch_size: int) -> dict[str, np.ndarray]:
    """Accuracy of every rule on each task's split (split ``j`` belongs to task ``j``): ``{rule: (len(splits),)}``."""
    out = {rule: [] for rule in RULES}
    for j, split in enumerate(splits):
        n = len(split.y)
        totals = {rule: 0 for rule in RULES}
        bs = max(1, min(batch_size, n))
        for start in range(0, n, bs):
            x, y, _, valid = padded(split.x[start:start + bs], split.y[start:start + bs], j, bs)
            counts = evaluate_fn(params, stats, x, y, valid, jnp.int32(j), jnp.int32(seen))
            for rule in RULES:
                totals[rule] += int(counts[rule])
        for rule in RULES:
            out[rule].append(totals[rule] / n if n else np.nan)
    return {rule: np.asarray(v) for rule, v in out.items()}


# ----------------------------------------------------------------------------- settings


def setting1(net: SplitBackbone, params: dict, stats: dict, scenario, *, batch_size: int, tx, key: jax.Array,
             eval_splits, eval_batch: int = 256, temperature: float = 1.0, log: Callable[[dict], None] | None = None,
             progress: bool = False) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Datasets in sequence, one pass each; ``R[rule][i, j]`` = accuracy on task j after task i.

    Val1 (right after task i) is ``R["til"][i, i]``, Val2 (after all) ``R["til"][-1, i]``.
    The optimizer state starts fresh for every task.
    """
    T = scenario.task_count
    step = make_train_step(net, tx, mixed=False)
    evaluate_fn = make_eval(net, temperature)
    R = {rule: np.full((T, T), np.nan) for rule in RULES}
    for t, task in enumerate(scenario.tasks):
        carry = (params, stats, tx.init(params))
        n = len(task.train.y)
        carry, m = train_online(step, carry, task_batches(task.train, t, batch_size, jax.random.fold_in(key, t)),
                                batch_size, total=-(-n // batch_size), desc=f"task {t + 1}/{T} {task.name}",
                                progress=progress)
        params, stats, _ = carry
        accs = evaluate(evaluate_fn, params, stats, eval_splits, seen=t + 1, batch_size=eval_batch)
        for rule in RULES:
            R[rule][t] = accs[rule]
        if log is not None:
            log({"task": t, "name": task.name, "examples": n, **m, **{f"{r}_row": R[r][t] for r in RULES}})
    return params, stats, R


def setting2(net: SplitBackbone, params: dict, stats: dict, scenario, *, batch_size: int, tx, seed: int,
             eval_splits, eval_batch: int = 256, temperature: float = 1.0, log: Callable[[dict], None] | None = None,
             progress: bool = False) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Batches drawn at random from the merged pool of all tasks, one pass; per-task accuracy of every rule.

    The task is unknown at test time: ``cil`` picks the head by max-probability,
    ``task_id`` is how often that pick is the true task.
    """
    step = make_train_step(net, tx, mixed=True)
    n = sum(len(t.train.y) for t in scenario.tasks)
    carry = (params, stats, tx.init(params))
    carry, m = train_online(step, carry, merged_stream(scenario, batch_size, seed), batch_size,
                            total=-(-n // batch_size), desc="merged stream", progress=progress)
    params, stats, _ = carry
    accs = evaluate(make_eval(net, temperature), params, stats, eval_splits, seen=scenario.task_count,
                    batch_size=eval_batch)
    if log is not None:
        log({"examples": n, **m, **{r: accs[r] for r in RULES}})
    return params, stats, accs


def pretrain(params: PyTree, stats: PyTree, split, num_classes: int, *, epochs: int, batch_size: int, lr: float,
             key: jax.Array, stem_mode: str, mean, std, progress: bool = False,
             log: Callable[[dict], None] | None = None) -> tuple[dict, dict]:
    """Train every layer of a resnet18 ``(params, stats)`` on a source split for ``epochs`` (Adam); returns the tree.

    Used so that frozen layers hold real features; the source head is discarded afterwards.
    """
    k_init, key = jax.random.split(key)
    layers = layer_list(params)
    groups = ("shared",) * (len(layers) - 1) + ("task",)
    net, gp, gs = build(groups, (num_classes,), k_init, init=(params, stats), stem_mode=stem_mode, mean=mean, std=std,
                        input_shape=split.x.shape[1:])
    tx = make_optimizer(lr, lr, "adam")
    step = make_train_step(net, tx, mixed=False)
    carry = (gp, gs, tx.init(gp))
    n = len(split.y)
    batch_size = min(batch_size, n)
    for epoch in range(epochs):
        batches = ((x, y, t) for x, y, t in task_batches(split, 0, batch_size, jax.random.fold_in(key, epoch))
                   if len(y) == batch_size)  # full batches only: BN statistics of a tiny last batch are noisy
        carry, m = train_online(step, carry, batches, batch_size, total=n // batch_size,
                                desc=f"pretrain epoch {epoch + 1}/{epochs}", progress=progress)
        if log is not None:
            log({"pretrain_epoch": epoch, **m})
    return backbone_of(net, carry[0], carry[1], 0)
