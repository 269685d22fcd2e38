"""Modular experts: a pool of small expert networks, similarity routing, specialization-driven allocation.

**Pool.** ``max_experts`` copies of one small MLP (``models.MLP``: per-task batch
norm rows, all tasks' class blocks side by side) stacked into one pytree with a
leading expert axis. Expert ``e`` serves the tasks ``membership[e]``; a task is
served by one expert, or by up to ``top_k`` reused experts mixed by soft top-k
routing weights.

**Router.** A fixed shared embedding: a Gaussian random projection of the raw
pixels in [0, 1] (``embed_dim`` wide, scaled by ``1/sqrt(embed_dim)``, so
cosines are preserved up to ~``1/sqrt(embed_dim)``; ``embed_dim=0`` uses the
pixels themselves), drawn once from the run's seed and never trained. Each
task gets ``prototypes`` centroids of its training inputs (spherical k-means
in the embedding, no raw data kept); an expert's prototypes are those of the
tasks it serves. Routing ``r(x) = argmax_e max_{p in e} cos(embed(x), p)``
(``routing.route``, jitted, batched); the task inside the expert is the task of
the best prototype. Training a task served by several experts mixes them with
``routing.soft_top_k`` over their similarity (the soft, differentiable variant).

**Specialization and allocation.** Routing statistics ``C[i, j]`` count the
held-out inputs of task ``j`` routed to expert ``i``; ``H(theta_i)`` is
``routing.specialization_entropy(C)`` (logged per expert after every task).
When task ``t`` arrives, an input *fits* expert ``e`` when its best cosine to
one of ``e``'s tasks reaches that task's radius (the ``radius_quantile``
quantile of the task's own training inputs' best cosine). ``e`` is reused when
(a) at least ``reuse_threshold`` of task ``t``'s inputs fit it and (b) its
specialization after taking them, ``H`` of ``C[e] + fit count at column t``,
stays at most ``max_entropy`` nats (default ``ln 2``: an expert may hold two
tasks evenly, not more); the best ``top_k`` such experts are reused, else a new
expert is allocated (``allocation="new"`` always allocates). With the pool
full, the best-fitting expert is reused ("forced"). A reused expert keeps its
earlier tasks through distillation (LwF: its pre-task outputs on their class
blocks, on the new task's inputs).

**Knowledge preservation.** ``importance`` (|w| or the diagonal empirical Fisher)
ranks a deprecated model's weights; ``select_valuable`` keeps the top
``keep`` fraction of each kernel plus the task's classifier block and batch
norm row; ``transfer`` copies exactly those entries into the leading corner of
the matching leaves of a (wider) new model, ``transfer_owner`` makes them the
task's frozen share of an owner map, so the new model computes the old task
with them alone while later tasks train the rest (``preserve``). Leaves whose
shapes do not fit (``transfer_plan``) are handed to distillation instead.

**Contract.** ``learner(cfg, scenario)`` is the pool as a ``Learner`` for
``modkd_jax.loop``: the state holds the pool, the router (projection,
prototypes, radii, membership) and the routing statistics; the train step is
``training.make_step`` over ``make_loss``; ``make_counts`` gives every rule of
one batch in one compiled call for ``evaluation.accuracies``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import evaluation, losses, masks, models, routing, task_inference, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, Split
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.methods import from_preset, mind
from modkd_jax.methods.mind import block_size_of

PyTree = Any
ALLOCATIONS = ("entropy", "new")
INFERENCE = task_inference.LOGIT_RULES + ("gauss_input", "prototype")  # prototype: the router itself, last
RULES = ("til",) + task_inference.result_rules(INFERENCE) + ("routing", "activated")


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """Hyperparameters of a modular-experts run (defaults: MNIST) and of its knowledge-preservation protocol."""

    hidden: tuple[int, ...] = (128, 128)  # widths of one expert MLP
    max_experts: int = 0  # pool capacity; 0 = one per task
    embed_dim: int = 128  # random projection width; 0 = raw pixels
    prototypes: int = 20  # k-means centroids per task
    kmeans_iters: int = 20
    radius_quantile: float = 0.1  # an input fits a task when its best cosine reaches this quantile of the task's own
    allocation: str = "entropy"  # "entropy" (reuse when fit and specialization allow) | "new" (one expert per task)
    reuse_threshold: float = 0.5  # share of the new task's inputs that must fit an expert to reuse it
    max_entropy: float = math.log(2.0)  # specialization ceiling (nats) of a reused expert
    top_k: int = 2  # experts one task may reuse (mixed by soft top-k)
    route_temperature: float = 0.05  # soft top-k temperature on cosines
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.001
    lr_milestone: float = 0.7
    optimizer: str = "adam"
    distill_beta: float = 1.0  # LwF weight protecting a reused expert's earlier tasks
    distill_temperature: float = 2.0
    eval_batch_size: int = 512
    stats_examples: int = 2000  # held-out inputs per task for routing statistics
    old_hidden: tuple[int, ...] = (64, 64)  # preservation: widths of the deprecated model
    keep: float = 0.5  # preservation: share of each deprecated kernel kept by importance
    inference: task_inference.InferenceConfig = task_inference.InferenceConfig()  # class-incremental task inference

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}")
        if min(self.epochs, self.batch_size, self.prototypes, self.top_k, self.kmeans_iters, self.eval_batch_size,
               self.stats_examples, len(self.hidden), len(self.old_hidden), *self.hidden, *self.old_hidden) < 1:
            raise ValueError("epochs, batch_size, prototypes, top_k, kmeans_iters, eval_batch_size, stats_examples "
                             "and the hidden widths must be at least 1")
        if not 0.0 <= self.radius_quantile <= 1.0 or not 0.0 <= self.reuse_threshold <= 1.0:
            raise ValueError("radius_quantile and reuse_threshold must lie in [0, 1]")
        if self.max_experts < 0 or self.embed_dim < 0:
            raise ValueError("max_experts and embed_dim must be non-negative")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {self.keep}")


# Per-dataset presets: ExpertsConfig fields plus the scenario's task count and validation share.
_MNIST = dict(task_count=5, val_fraction=0.1, epochs=2)
PRESETS = {
    "mnist": _MNIST,
    "fashion_mnist": _MNIST,
    "digits": dict(task_count=5, val_fraction=0.1, epochs=20, batch_size=32, hidden=(32, 32), embed_dim=32,
                   prototypes=8, old_hidden=(16, 16)),
}


def preset_config(dataset: str, **overrides) -> ExpertsConfig:
    """The ExpertsConfig of a dataset's preset (``PRESETS``), with ``overrides``."""
    return from_preset(ExpertsConfig, PRESETS[dataset], **overrides)


# --- Pool, embedding, routing --------------------------------------------------------------------


def take(tree: PyTree, idx) -> PyTree:
    """Row(s) ``idx`` of every leaf of a stacked pytree (one expert, or several along a new axis)."""
    return jax.tree.map(lambda a: a[idx], tree)


def init_pool(model, key: jax.Array, input_shape: tuple[int, ...], n: int) -> tuple[PyTree, PyTree]:
    """``n`` independently initialised experts stacked on a leading axis: ``(params, batch_stats)``."""
    return jax.vmap(lambda k: models.init(model, k, input_shape))(jax.random.split(key, n))


def random_projection(key: jax.Array, in_dim: int, dim: int) -> jax.Array:
    """The fixed shared embedding: Gaussian ``(in_dim, dim) / sqrt(dim)``; ``dim=0`` gives an empty (pixel) one."""
    if dim == 0:
        return jnp.zeros((in_dim, 0), jnp.float32)
    return jax.random.normal(key, (in_dim, dim), jnp.float32) / math.sqrt(dim)


def embed(projection: jax.Array, x_uint8: jax.Array) -> jax.Array:
    """Unit-norm embedding of uint8 images: pixels in [0, 1], flattened, projected (or not, if empty)."""
    flat = x_uint8.reshape(x_uint8.shape[0], -1).astype(jnp.float32) / 255.0
    return routing.l2_normalize(flat @ projection if projection.shape[-1] else flat)


def task_scores(emb: jax.Array, prototypes: jax.Array, seen: jax.Array) -> jax.Array:
    """Best cosine of every input to each task's prototypes: ``(B, T)``, ``-inf`` for unseen tasks."""
    T, K, d = prototypes.shape
    member = jnp.repeat(jnp.eye(T, dtype=bool) & seen[:, None], K, axis=1)  # task j owns its K prototypes
    return routing.prototype_scores(emb, prototypes.reshape(T * K, d), member)


def expert_prototypes(membership: jax.Array, k: int) -> jax.Array:
    """Which of the ``T * k`` prototypes each expert owns: ``(E, T * k)``, from ``membership (E, T)``."""
    return jnp.repeat(membership, k, axis=1)


def route(router: PyTree, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(expert, task)`` per embedded input: the expert with the most similar prototype and that prototype's task."""
    T, K, d = router["prototypes"].shape
    member = expert_prototypes(router["membership"] & router["seen"][None], K)
    expert = routing.route(emb, router["prototypes"].reshape(T * K, d), member)
    return expert, jnp.argmax(task_scores(emb, router["prototypes"], router["seen"]), axis=-1)


def task_weights(router: PyTree, emb: jax.Array, task, top_k: int, temperature: float) -> jax.Array:
    """Mixture weights ``(B, E)`` of the experts serving ``task`` (one, or one per input), 0 for the others.

    Soft top-k over the experts' similarity to the input through their *other*
    tasks' prototypes (what each already knows; 0 for an expert with no other
    task). A single expert gets weight 1.
    """
    T, K, d = router["prototypes"].shape
    served = router["membership"] & router["seen"][None]  # (E, T)
    protos = router["prototypes"].reshape(T * K, d)
    others = lambda j: expert_prototypes(served & (jnp.arange(T) != j)[None], K)  # noqa: E731
    per_task = jax.vmap(lambda j: routing.prototype_scores(emb, protos, others(j)))(jnp.arange(T))  # (T, B, E)
    task = jnp.broadcast_to(task, emb.shape[:1])
    s = per_task[task, jnp.arange(emb.shape[0])]
    s = jnp.where(served.T[task], jnp.where(jnp.isfinite(s), s, 0.0), -jnp.inf)
    return routing.soft_top_k(s, top_k, temperature)


def block_at(logits: jax.Array, task, size: int) -> jax.Array:
    """The class block of ``task`` (one, or one per input) of logits ``(..., B, out)``."""
    idx = jnp.broadcast_to(task, logits.shape[-2:-1])[:, None] * size + jnp.arange(size)
    return jnp.take_along_axis(logits, jnp.broadcast_to(idx, (*logits.shape[:-1], size)), axis=-1)


def mix(z: jax.Array, weights: jax.Array) -> jax.Array:
    """``log sum_s w_s softmax(z[s])`` of block logits ``z (S, B, block)``, ``weights (B, S)``; 0 weights drop out."""
    logp = jax.nn.log_softmax(z, axis=-1)
    on = (weights > 0).T[..., None]
    logw = jnp.log(jnp.where(weights > 0, weights, 1.0)).T[..., None]
    return jax.scipy.special.logsumexp(jnp.where(on, logp + logw, -jnp.inf), axis=0)


# --- Allocation ----------------------------------------------------------------------------------


def fit_shares(scores: jax.Array, radius: jax.Array, membership: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per expert, how many (and which share) of the inputs fit it: best cosine to one of its tasks >= that radius."""
    fits = np.asarray(scores) >= np.asarray(radius)[None]  # (N, T); -inf for unseen tasks never fits
    per_expert = (fits[:, None, :] & np.asarray(membership)[None]).any(-1)  # (N, E)
    count = per_expert.sum(0)
    return count, count / max(len(fits), 1)


def allocate(cfg: ExpertsConfig, task: int, counts: np.ndarray, fit_count: np.ndarray, share: np.ndarray,
             active: np.ndarray) -> tuple[list[int], str, dict]:
    """Experts for a new ``task``: reuse fitting specialists, else a new expert; ``(experts, decision, info)``.

    ``counts (E, T)`` are the routing statistics so far, ``fit_count``/``share``
    how many / which share of the task's inputs fit each expert.
    """
    after = np.asarray(counts, np.float64).copy()
    after[:, task] += fit_count
    h_after = np.asarray(routing.specialization_entropy(after))
    ok = active & (share >= cfg.reuse_threshold) & (np.nan_to_num(h_after, nan=0.0) <= cfg.max_entropy + 1e-9)
    info = {"fit_share": share, "entropy_if_reused": h_after}
    if cfg.allocation == "entropy" and ok.any():
        order = [int(e) for e in np.argsort(-share, kind="stable") if ok[e]]
        return order[: cfg.top_k], "reuse", info
    free = np.flatnonzero(~active)
    if len(free):
        return [int(free[0])], "new", info
    return [int(np.argmax(np.where(active, share, -1.0)))], "forced", info


# --- Training and evaluation ---------------------------------------------------------------------


class Inputs(NamedTuple):
    """What the pool's loss sees of one batch: standardised inputs, labels, the task's expert weights ``(B, S)``."""

    x: jax.Array
    y: jax.Array
    weights: jax.Array


class Context(NamedTuple):
    """What one train step needs besides the batch: the task, the router, its experts and the LwF teacher."""

    task: jax.Array  # int32 scalar
    router: PyTree
    slots: jax.Array  # (S,) the task's experts (S static: one compile per count)
    trainable: PyTree  # the gate of ``optim.gated``: the rows of ``slots``
    old: jax.Array | None = None  # (S, T) earlier tasks of each slot (LwF)
    teacher: PyTree = None  # the pool before the task (LwF)


def make_loss(model, cfg: ExpertsConfig, block_size: int, num_tasks: int, distill: bool) -> Callable:
    """CE of the task's soft top-k mixture, plus ``distill_beta *`` LwF on the reused experts' earlier tasks."""

    def loss_fn(params, batch_stats, inputs: Inputs, ctx: Context):
        sub_p, sub_bs = take(params, ctx.slots), take(batch_stats, ctx.slots)
        logits, new = jax.vmap(lambda p, b: model.apply({"params": p, "batch_stats": b}, inputs.x, ctx.task,
                                                        train=True, mutable=["batch_stats"]))(sub_p, sub_bs)
        mixed = mix(training.block(logits, ctx.task, block_size), inputs.weights)
        ce = -jnp.mean(jnp.take_along_axis(mixed, inputs.y[:, None], axis=1))
        extra = jnp.zeros(())
        if distill:
            def kd(p, b, tv, j):
                s = model.apply({"params": p, "batch_stats": b}, inputs.x, j, train=False)
                t = model.apply(tv, inputs.x, j, train=False)
                return losses.kd_kl(training.block(s, j, block_size), training.block(t, j, block_size),
                                    cfg.distill_temperature)

            tasks = jnp.arange(num_tasks)
            per = jax.vmap(lambda p, b, tv: jax.vmap(lambda j: kd(p, b, tv, j))(tasks))(
                sub_p, sub_bs, take(ctx.teacher, ctx.slots))
            extra = jnp.sum(jnp.where(ctx.old, per, 0.0)) / jnp.maximum(jnp.sum(ctx.old), 1)
        batch_stats = jax.tree.map(lambda a, n: a.at[ctx.slots].set(n), batch_stats, new["batch_stats"])
        acc = jnp.mean(jnp.argmax(mixed, -1) == inputs.y)
        return ce + cfg.distill_beta * extra, (batch_stats, {"ce": ce, "distill": extra, "acc": acc})

    return loss_fn


def make_counts(model, cfg: ExpertsConfig, block_size: int, mean, std) -> Callable:
    """``counts(pool, router, inference, x, y, valid, true_task, seen)`` of every rule in ``RULES``, jitted.

    til: the true task's experts; cil / task_id (and ``cil_<rule>`` / ``task_id_<rule>``): the task
    inferred by the rule in use (every rule of ``INFERENCE``; ``prototype`` is the router's), the class
    by that task's experts; routing: routed to an expert of the true task; activated: experts a
    prediction runs (its inferred task's). One compiled call runs every expert for every task (weight 0
    drops out exactly); the router holds what is seen.
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def counts(pool, router, inference, x, y, valid, true_task, seen):
        xf, emb = batching.to_float(x, mean, std), embed(router["projection"], x)
        expert, routed = route(router, emb)
        num_tasks = router["prototypes"].shape[0]

        def per_task(t):  # task t's mixture: log-probabilities (B, k) and free energy (B,)
            logits = block_at(jax.vmap(lambda v: model.apply(v, xf, t, train=False))(pool), t, block_size)
            w = task_weights(router, emb, t, cfg.top_k, cfg.route_temperature)  # (B, E)
            return mix(logits, w), jnp.sum(w.T * jax.nn.logsumexp(logits, axis=-1), axis=0)

        mixed, energy = jax.lax.map(per_task, jnp.arange(num_tasks))
        tasks = task_inference.infer(INFERENCE[:-1], mixed, seen, x=task_inference.pixels(x), stats=inference,
                                     energy=energy)
        tasks["prototype"] = routed
        cls = jnp.argmax(mixed, axis=-1)
        out = {"til": jnp.sum(valid & (cls[true_task] == y))}
        out.update(task_inference.rule_counts(tasks, cls, y, valid, true_task, inference["rule"]))
        chosen = jnp.stack([tasks[r] for r in INFERENCE])[inference["rule"]]
        member = router["membership"]
        out["routing"] = jnp.sum(valid & member[expert, true_task])
        out["activated"] = jnp.sum(jnp.where(valid, member[:, chosen].sum(0), 0))
        return out

    return counts


def make_stats_counts(cfg: ExpertsConfig) -> Callable:
    """``counts(router, x, y, valid, true_task, seen) -> {"to_expert": (E,)}``: routing statistics' column, jitted.

    An input routed to a task that several experts share (a tie of their
    prototypes) counts for each by its soft top-k weight.
    """

    @jax.jit
    def counts(router, x, y, valid, true_task, seen):
        emb = embed(router["projection"], x)
        expert, task = route(router, emb)
        w = task_weights(router, emb, task, cfg.top_k, cfg.route_temperature)
        single = router["membership"][:, task].sum(0) < 2
        share = jnp.where(single[:, None], jax.nn.one_hot(expert, w.shape[-1]), w)
        return {"to_expert": jnp.sum(jnp.where(valid[:, None], share, 0.0), axis=0)}

    return counts


@dataclasses.dataclass(frozen=True)
class Experts:
    """Everything static about a run: the expert network, compiled steps and counts functions."""

    cfg: ExpertsConfig
    scenario: Scenario
    model: Any
    block_size: int
    num_experts: int
    tx: Any
    steps: dict[bool, Callable]  # keyed by "distil (LwF)"
    counts: Callable
    stats_counts: Callable

    @property
    def task_count(self) -> int:
        return self.scenario.task_count


def setup(cfg: ExpertsConfig, scenario: Scenario) -> Experts:
    """Expert network, compiled steps and counts functions for ``cfg`` on ``scenario``."""
    k, T = block_size_of(scenario), scenario.task_count
    cfg.inference.check(INFERENCE, all(len(task.val.y) for task in scenario.tasks))
    model = models.build("mlp", k * T, T, hidden=tuple(cfg.hidden))
    mean, std = (jnp.asarray(a, jnp.float32) for a in scenario.norm)
    tx = training.make_optimizer(cfg.optimizer, cfg.lr)

    def prepare(batch: training.Batch, key: jax.Array, ctx: Context) -> Inputs:
        w = task_weights(ctx.router, embed(ctx.router["projection"], batch.x), ctx.task, cfg.top_k,
                         cfg.route_temperature)
        return Inputs(batching.augment(key, batch.x, mean, std, False), batch.y, jnp.take(w, ctx.slots, axis=1))

    steps = {d: training.make_step(make_loss(model, cfg, k, T, d), tx, prepare) for d in (False, True)}
    return Experts(cfg, scenario, model, k, cfg.max_experts or T, tx, steps, make_counts(model, cfg, k, mean, std),
                   make_stats_counts(cfg))


def init_state(ex: Experts, key: jax.Array) -> PyTree:
    """The pool before any task: random experts, none active, no prototypes."""
    k_pool, k_proj = jax.random.split(key)
    params, batch_stats = init_pool(ex.model, k_pool, ex.scenario.input_shape, ex.num_experts)
    T, E, K = ex.task_count, ex.num_experts, ex.cfg.prototypes
    in_dim = int(np.prod(ex.scenario.input_shape))
    router = {"projection": random_projection(k_proj, in_dim, ex.cfg.embed_dim),
              "prototypes": jnp.zeros((T, K, ex.cfg.embed_dim or in_dim), jnp.float32),
              "radius": jnp.full((T,), jnp.inf, jnp.float32), "membership": jnp.zeros((E, T), bool),
              "seen": jnp.zeros((T,), bool)}
    inference = task_inference.init_stats(ex.cfg.inference, INFERENCE, T, ex.block_size, in_dim,
                                          fitted=("gauss_input",))
    return {"params": params, "batch_stats": batch_stats, "router": router,
            "counts": jnp.zeros((E, T), jnp.float32), "active": jnp.zeros((E,), bool), "inference": inference}


def stats_split(ex: Experts, task) -> Split:
    """Held-out inputs of a task for routing statistics (validation split, else the first training inputs)."""
    split = task.val if len(task.val) else task.train
    n = min(len(split), ex.cfg.stats_examples)
    return Split(split.x[:n], split.y[:n], split.y_global[:n])


_embed_jit = jax.jit(embed)


def _embed_all(projection, x: np.ndarray) -> jax.Array:
    """Embeddings of many images, 4096 at a time."""
    return jnp.concatenate([_embed_jit(projection, x[i:i + 4096]) for i in range(0, len(x), 4096)])


def routing_statistics(ex: Experts, router: PyTree, seen: int) -> np.ndarray:
    """``C (E, T)``: held-out inputs of each seen task routed to each expert."""
    splits = [stats_split(ex, ex.scenario.tasks[j]) for j in range(seen)]
    counts = np.zeros((ex.num_experts, ex.task_count), np.float64)
    for j, (c, _) in enumerate(evaluation.counts_per_split(ex.stats_counts, (router,), splits, seen,
                                                           ex.cfg.eval_batch_size)):
        if c is not None:
            counts[:, j] = c["to_expert"]
    return counts


def learn_task(ex: Experts, state: PyTree, t: int, key: jax.Array, log: Callable[[dict], None] | None = None,
               progress: bool = False) -> tuple[PyTree, dict]:
    """Allocate experts for task ``t``, add its prototypes, train; returns the new state and a summary."""
    cfg, task = ex.cfg, ex.scenario.tasks[t]
    k_km, k_train = jax.random.split(key)
    router = dict(state["router"])
    active = np.asarray(state["active"]).copy()
    membership = np.asarray(router["membership"]).copy()
    # 1. fit of the new task's held-out inputs to every expert, then the allocation decision
    held = _embed_all(router["projection"], stats_split(ex, task).x)
    scores = task_scores(held, router["prototypes"], router["seen"])
    fit_count, share = fit_shares(scores, router["radius"], membership)
    experts, decision, alloc = allocate(cfg, t, np.asarray(state["counts"]), fit_count, share, active)
    # 2. the task's prototypes and fit radius, from its training inputs
    z = _embed_all(router["projection"], task.train.x)
    protos = routing.spherical_kmeans(k_km, z, min(cfg.prototypes, len(z)), cfg.kmeans_iters)
    protos = jnp.concatenate([protos, jnp.repeat(protos[:1], cfg.prototypes - protos.shape[0], 0)])
    own = jnp.max(z @ protos.T, axis=1)
    old = membership[np.sort(experts)].copy()  # earlier tasks of the chosen experts (LwF when reused)
    membership[experts, t] = True
    active[experts] = True
    router.update(prototypes=router["prototypes"].at[t].set(protos),
                  radius=router["radius"].at[t].set(jnp.quantile(own, cfg.radius_quantile)),
                  membership=jnp.asarray(membership), seen=router["seen"].at[t].set(True))
    # 3. train the chosen experts on the task (soft top-k mixture when several), LwF on their earlier tasks
    slots = np.flatnonzero(membership[:, t]).astype(np.int32)  # == sorted(experts)
    distill = bool(old.any())
    rows = jnp.asarray(membership[:, t])
    trn = jax.tree.map(lambda a: jnp.broadcast_to(rows.reshape((-1,) + (1,) * (a.ndim - 1)), a.shape),
                       state["params"])
    teacher = None  # a copy: the carry's buffers are donated to the step
    if distill:
        teacher = jax.tree.map(jnp.copy, {"params": state["params"], "batch_stats": state["batch_stats"]})
    ctx = Context(jnp.int32(t), router, jnp.asarray(slots), trn, jnp.asarray(old) if distill else None, teacher)
    phase = training.Phase(cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_milestone)
    tagged = None if log is None else (lambda m: log({"task": t, "phase": "train", **m}))
    carry = (state["params"], state["batch_stats"], ex.tx.init(state["params"]))
    params, batch_stats, _ = training.run_phase(ex.steps[distill], carry, task.train, ctx, phase, k_train,
                                                desc=f"task {t} experts {experts}", log=tagged, progress=progress)
    counts = routing_statistics(ex, router, t + 1)
    # task inference: the task's Gaussians (its training pixels only), the rule in use on the seen tasks' validation
    inference = task_inference.fit_task(cfg.inference, state["inference"], t, task.train.y, len(task.classes),
                                        x=np.asarray(task_inference.pixels(task.train.x)), key=k_km)
    args = ({"params": params, "batch_stats": batch_stats}, router, inference)
    rule, choice = evaluation.choose_rule(
        cfg.inference, INFERENCE, lambda s: evaluation.counts_per_split(ex.counts, args, s, t + 1, cfg.eval_batch_size),
        [ex.scenario.tasks[j].val for j in range(t + 1)])
    inference["rule"] = jnp.int32(rule)
    state = {"params": params, "batch_stats": batch_stats, "router": router,
             "counts": jnp.asarray(counts, jnp.float32), "active": jnp.asarray(active), "inference": inference}
    info = {"task": t, "task_inference": choice, "experts": experts, "decision": decision,
            "fit_share": np.asarray(alloc["fit_share"]),
            "entropy_if_reused": np.asarray(alloc["entropy_if_reused"]),
            "specialization": np.asarray(routing.specialization_entropy(counts)), "routing_counts": np.asarray(counts),
            "active_experts": int(active.sum())}
    return state, info


def evaluate(ex: Experts, state: PyTree, splits, seen: int, task_ids=None) -> dict[str, np.ndarray]:
    """Per split, every rule of ``RULES`` (``make_counts``; ``activated`` as experts per prediction); NaN if unseen."""
    task_ids = list(range(len(splits)) if task_ids is None else task_ids)
    done = [i for i, j in enumerate(task_ids) if j < seen]
    pool = {"params": state["params"], "batch_stats": state["batch_stats"]}
    acc = evaluation.accuracies(ex.counts, (pool, state["router"], state["inference"]), [splits[i] for i in done],
                                seen, ex.cfg.eval_batch_size, [task_ids[i] for i in done])
    out = {r: np.full(len(splits), np.nan) for r in RULES}
    for r, values in acc.items():
        out[r][done] = values
    return out


# --- Size and compute per prediction -------------------------------------------------------------


def mlp_params(hidden, num_outputs: int, num_tasks: int, input_shape) -> int:
    """Parameter count of ``models.MLP`` (shapes only, nothing initialised)."""
    model = models.build("mlp", num_outputs, num_tasks, hidden=tuple(hidden))
    shapes = jax.eval_shape(lambda: models.init(model, jax.random.key(0), tuple(input_shape))[0])
    return int(sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)))


def pool_params(cfg: ExpertsConfig, scenario: Scenario) -> dict[str, int]:
    """Stored parameters of the expert pool: experts, projection, prototypes (+ radii)."""
    T, k = scenario.task_count, block_size_of(scenario)
    in_dim = int(np.prod(scenario.input_shape))
    out = {"experts": (cfg.max_experts or T) * mlp_params(cfg.hidden, k * T, T, scenario.input_shape),
           "projection": in_dim * cfg.embed_dim, "prototypes": T * cfg.prototypes * (cfg.embed_dim or in_dim) + T}
    out["total"] = sum(out.values())
    return out


def mlp_flops(in_dim: int, hidden, out_dim: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one MLP forward pass per example; norms, biases and ReLUs excluded."""
    dims = [in_dim, *hidden, out_dim]
    return int(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])))


def router_flops(in_dim: int, embed_dim: int, num_prototypes: int) -> int:
    """Matmul FLOPs per example of the router: the projection plus cosines to every stored prototype."""
    d = embed_dim or in_dim
    return 2 * in_dim * embed_dim + 2 * d * num_prototypes


def inference_flops(rule: str, in_dim: int, seen: int, membership: np.ndarray, expert: int, router: int,
                    gauss: dict) -> float:
    """FLOPs per example of a class-incremental prediction under ``rule``, before the chosen task's experts run.

    ``prototype``: the router; ``gauss_input``: every seen task's Gaussians (a projection of rank r
    and a distance per Gaussian); the rules over outputs run every seen task's experts (and the router
    where a task mixes several).
    """
    if rule == "prototype":
        return router
    if rule == "gauss_input":
        G, r = gauss["mean"].shape[1], gauss["basis"].shape[-1]
        return seen * G * 2 * in_dim * (r + 1)
    runs = membership[:, :seen].sum()
    return runs * expert + (router if runs > seen else 0)


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs XLA reports for ``jit(fn)(*args)`` (a cross-check of the analytic counts; loop-free code only)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def report(ex: Experts, state: PyTree, infos: list[dict]) -> dict:
    """FLOPs per prediction, membership, routing counts, pool size and task inference of a run.

    ``flops["til"]`` runs the true task's experts (plus the router when it mixes
    several); a class-incremental prediction costs ``flops["inference"]`` (the rule
    in use, ``inference_flops``) plus the final ``activated`` accuracy-matrix row's
    mean times ``flops["expert_forward"]``.
    """
    sc, cfg = ex.scenario, ex.cfg
    in_dim, T = int(np.prod(sc.input_shape)), ex.task_count
    expert = mlp_flops(in_dim, cfg.hidden, ex.block_size * T)
    one = take({"params": state["params"], "batch_stats": state["batch_stats"]}, 0)
    xla = compiled_flops(lambda v, x: ex.model.apply(v, x, 0, train=False), one,
                         jnp.zeros((1, *sc.input_shape), jnp.float32))
    membership = np.asarray(state["router"]["membership"])
    seen = np.asarray(state["router"]["seen"])
    til_activated = float(np.mean(membership[:, seen].sum(0))) if seen.any() else 0.0
    router = router_flops(in_dim, cfg.embed_dim, T * cfg.prototypes)
    inference = evaluation.inference_report(state["inference"], INFERENCE, infos)
    inference["task_inference"]["bytes_per_task"]["prototype"] = int(state["router"]["prototypes"][0].nbytes)
    rule = INFERENCE[int(state["inference"]["rule"])]
    gauss = jax.tree.map(np.asarray, state["inference"]["gauss_input"])
    return {"flops": {"til": til_activated * expert + (router if til_activated > 1 else 0),
                      "expert_forward": expert, "router": router, "xla_expert_forward": xla,
                      "inference": inference_flops(rule, in_dim, int(seen.sum()), membership, expert, router, gauss)},
            "membership": membership.tolist(), "routing_counts": np.asarray(state["counts"], float).tolist(),
            **inference}


def describe(info: dict) -> str:
    """The per-task line's extras: the task's experts, the decision, the active experts."""
    return f"experts {info['experts']} ({info['decision']}), {info['active_experts']} active"


def learner(cfg: ExpertsConfig, scenario: Scenario) -> Learner:
    """The expert pool as a ``Learner`` (rules ``RULES``; ``report`` gives FLOPs, membership, routing counts)."""
    ex = setup(cfg, scenario)
    tests = [task.test for task in scenario.tasks]
    return Learner(
        name="experts", rules=("til", "cil", "task_id", "routing"), init_state=lambda key: init_state(ex, key),
        learn_task=lambda state, t, key, **kw: learn_task(ex, state, t, key, **kw),
        evaluate=lambda state, seen: evaluate(ex, state, tests, seen),
        param_counts=lambda state: pool_params(cfg, scenario), report=lambda state, infos: report(ex, state, infos),
        describe=describe, **scenario_fields(scenario))

# --- Knowledge preservation ----------------------------------------------------------------------


def _paths(tree: PyTree) -> dict[str, jax.Array]:
    """Leaves keyed by their '/'-joined path."""
    return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fits(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    return len(small) == len(big) and all(a <= b for a, b in zip(small, big))


def transfer_plan(old: PyTree, new: PyTree) -> dict[str, str]:
    """Per leaf of the old model: ``"copy"`` when a leaf of the new model with the same path has room for it
    (same rank, no axis smaller), else ``"distill"``."""
    new_leaves = _paths(new)
    return {path: "copy" if path in new_leaves and _fits(leaf.shape, new_leaves[path].shape) else "distill"
            for path, leaf in _paths(old).items()}


def importance(params: PyTree, kind: str = "magnitude", fisher: PyTree | None = None) -> PyTree:
    """Importance of every weight: ``|w|`` (``"magnitude"``) or a diagonal Fisher given in ``fisher``."""
    if kind == "magnitude":
        return jax.tree.map(jnp.abs, params)
    if kind == "fisher":
        if fisher is None:
            raise ValueError("importance='fisher' needs the Fisher diagonal (training.fisher_diagonal)")
        return fisher
    raise ValueError(f"unknown importance {kind!r}; expected 'magnitude' or 'fisher'")


def select_valuable(scores: PyTree, kinds: PyTree, task: int, keep: float, block_size: int) -> PyTree:
    """Boolean pytree (old shapes) of the weights worth keeping for ``task``.

    Gated kernels: the top ``keep`` fraction by ``scores`` (exactly
    ``round(keep * size)`` entries); classifier leaves: the task's class block;
    per-task leaves (batch norm): the task's row.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1], got {keep}")

    def leaf(s, kind):
        if kind == masks.GATED:
            count = int(round(keep * s.size))
            flat = jnp.zeros(s.size, bool)
            if count:
                flat = flat.at[jax.lax.top_k(s.reshape(-1).astype(jnp.float32), count)[1]].set(True)
            return flat.reshape(s.shape)
        if kind == masks.CLASSIFIER:
            cols = (jnp.arange(s.shape[-1]) // block_size) == task
            return jnp.broadcast_to(cols, s.shape)
        return jnp.broadcast_to((jnp.arange(s.shape[0]) == task).reshape((-1,) + (1,) * (s.ndim - 1)), s.shape)

    return jax.tree.map(leaf, scores, kinds)


def embed_corner(small: jax.Array, shape: tuple[int, ...], fill) -> jax.Array:
    """``small`` placed at the leading corner of an array of ``shape``, ``fill`` elsewhere."""
    out = jnp.full(shape, fill, small.dtype)
    return out.at[tuple(slice(0, n) for n in small.shape)].set(small)


def transfer(old: PyTree, new: PyTree, selection: PyTree) -> PyTree:
    """``new`` with exactly the ``selection``ed entries of ``old`` copied in (leading corner of the same-path leaf).

    Every other entry of ``new`` is returned unchanged, bit for bit; leaves the
    plan marks ``"distill"`` are skipped (``transfer_plan``).
    """
    plan, old_l, sel_l = transfer_plan(old, new), _paths(old), _paths(selection)

    def leaf(path, n):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if plan.get(key) != "copy":
            return n
        where = embed_corner(sel_l[key], n.shape, False)
        return jnp.where(where, embed_corner(old_l[key].astype(n.dtype), n.shape, 0), n)

    return jax.tree_util.tree_map_with_path(leaf, new)


def transfer_owner(owner: PyTree, selection: PyTree, kinds: PyTree, task: int) -> PyTree:
    """An owner map in which ``task`` owns exactly the transferred gated weights (other owners untouched)."""
    sel_l = _paths(selection)

    def leaf(path, o, kind):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if kind != masks.GATED or key not in sel_l or not _fits(sel_l[key].shape, o.shape):
            return o
        return jnp.where(embed_corner(sel_l[key], o.shape, False), jnp.asarray(task, o.dtype), o)

    return jax.tree_util.tree_map_with_path(leaf, owner, kinds)


def transfer_batch_stats(old: PyTree, new: PyTree, task: int) -> PyTree:
    """``new`` running statistics with row ``task`` of the old model's copied in (leading corner)."""
    old_l = _paths(old)

    def leaf(path, n):
        o = old_l.get(jax.tree_util.keystr(path, simple=True, separator="/"))
        if o is None or not _fits(o.shape, n.shape):
            return n
        rows = embed_corner(jnp.broadcast_to((jnp.arange(o.shape[0]) == task)[:, None], o.shape), n.shape, False)
        return jnp.where(rows, embed_corner(o, n.shape, 0), n)

    return jax.tree_util.tree_map_with_path(leaf, new)




def make_distill_loss(apply_new: Callable, block_size: int, temperature: float) -> Callable:
    """Pure distillation (no labels) of the frozen old model's block (``inputs.teacher``) into ``ctx.forward``."""

    def loss_fn(params, batch_stats, inputs: training.Inputs, ctx: mind.Context):
        logits, new = apply_new({"params": masks.gate(params, ctx.forward), "batch_stats": batch_stats}, inputs.x,
                                ctx.task, train=True, mutable=["batch_stats"])
        z = training.block(logits, ctx.task, block_size)
        agree = jnp.mean(jnp.argmax(z, -1) == jnp.argmax(inputs.teacher, -1))
        return losses.kd_kl(z, inputs.teacher, temperature), (new["batch_stats"], {"acc": agree})

    return loss_fn


def preserve(old_model, old_vars: PyTree, new_model, scenario: Scenario, key: jax.Array, *, old_task: int = 0,
             new_task: int = 1, method: str = "copy", importance_kind: str = "magnitude", keep: float = 0.5,
             epochs: int = 5, distill_epochs: int | None = None, batch_size: int = 128, lr: float = 0.001,
             temperature: float = 2.0, eval_batch_size: int = 512, progress: bool = False) -> dict:
    """Deprecate ``old_model`` (trained on ``old_task``) in favour of ``new_model`` and continue learning.

    ``method``: ``"copy"`` (valuable weights by ``importance_kind`` copied in and
    frozen as the old task's share), ``"distill"`` (the old task's share, a
    ``keep`` fraction drawn at random, distilled from the old model on the new
    task's inputs: no old data), ``"auto"`` (copy when every valuable leaf fits,
    else distill) or ``"none"`` (a fresh model). Then the new task trains the
    remaining weights. Returns accuracies on the old task before, right after the
    transfer and after the new task, the new task's, and what was copied.
    """
    k = block_size_of(scenario)
    mean, std = (tuple(float(v) for v in a) for a in scenario.norm)
    old_t, new_t = scenario.tasks[old_task], scenario.tasks[new_task]
    T = scenario.task_count
    k_init, k_sel, k_dist, k_train = jax.random.split(key, 4)
    params, batch_stats = models.init(new_model, k_init, scenario.input_shape)
    kinds, old_kinds = models.leaf_kinds(params), models.leaf_kinds(old_vars["params"])
    owner = masks.init_owners(params, kinds, (k,) * T)
    plan = transfer_plan(old_vars["params"], params)
    if method == "auto":
        method = "copy" if all(v == "copy" for v in plan.values()) else "distill"
    if method not in ("copy", "distill", "none"):
        raise ValueError(f"unknown preservation method {method!r}; expected copy, distill, auto or none")
    old_counts = evaluation.make_block_counts(old_model.apply, k, mean, std)
    new_counts = evaluation.make_block_counts(new_model.apply, k, mean, std)
    info = {"method": method, "importance": importance_kind, "keep": keep,
            "old_acc": evaluation.block_accuracy(old_counts, old_vars, old_t.test, old_task, eval_batch_size),
            "plan": plan}
    tx = training.make_optimizer("adam", lr)
    if method == "copy":
        fisher = (training.fisher_diagonal(training.make_fisher(old_model.apply, k, mean, std), old_vars,
                                           old_t.train, old_task)
                  if importance_kind == "fisher" else None)
        selection = select_valuable(importance(old_vars["params"], importance_kind, fisher), old_kinds, old_task,
                                    keep, k)
        params = transfer(old_vars["params"], params, selection)
        batch_stats = transfer_batch_stats(old_vars["batch_stats"], batch_stats, old_task)
        owner = transfer_owner(owner, selection, kinds, old_task)
        sel_gated = [s for s, kd in zip(jax.tree.leaves(selection), jax.tree.leaves(old_kinds)) if kd == masks.GATED]
        info["copied_gated"] = int(sum(int(s.sum()) for s in sel_gated))
    elif method == "distill":
        # a random ``keep`` share of every gated layer becomes the old task's
        owner = masks.assign(owner, kinds, old_task, old_task + max(1, int(round(1 / max(keep, 1e-9)))),
                             policy="random", key=k_sel)
        params = masks.reinit_assigned(params, owner, kinds, old_task, "keep")
        teacher = lambda ctx, x: training.block(old_model.apply(ctx.teacher, x, ctx.task, train=False),  # noqa: E731
                                                ctx.task, k)
        step = training.make_step(make_distill_loss(new_model.apply, k, temperature), tx,
                                  training.augmenting(mean, std, teacher=teacher))
        ctx = mind.Context(jnp.int32(old_task), masks.forward_mask(owner, old_task),
                           masks.trainable_mask(owner, old_task), old_vars)
        params, batch_stats, _ = training.run_phase(
            step, (params, batch_stats, tx.init(params)), new_t.train, ctx,
            training.Phase(distill_epochs or epochs, batch_size, lr, 0.7), k_dist, desc="distill old model",
            progress=progress)
    gated_now = {"params": masks.gate(params, masks.forward_mask(owner, old_task)), "batch_stats": batch_stats}
    info["transferred_acc"] = evaluation.block_accuracy(new_counts, gated_now, old_t.test, old_task, eval_batch_size)
    # continue learning: the new task takes every weight the old task does not own
    owner = masks.assign(owner, kinds, new_task, new_task + 1, policy="random", key=k_sel)
    ctx = mind.Context(jnp.int32(new_task), masks.forward_mask(owner, new_task), masks.trainable_mask(owner, new_task))
    step = training.make_step(mind.make_loss(new_model.apply, k), tx, training.augmenting(mean, std))
    params, batch_stats, _ = training.run_phase(step, (params, batch_stats, tx.init(params)), new_t.train, ctx,
                                                training.Phase(epochs, batch_size, lr, 0.7), k_train, desc="continue",
                                                progress=progress)
    for name, t, split in (("retained_acc", old_task, old_t.test), ("new_task_acc", new_task, new_t.test)):
        v = {"params": masks.gate(params, masks.forward_mask(owner, t)), "batch_stats": batch_stats}
        info[name] = evaluation.block_accuracy(new_counts, v, split, t, eval_batch_size)
    info["retained_fraction"] = info["retained_acc"] / max(info["old_acc"], 1e-9)
    return info
