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
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from modkd_jax import losses, masks, models, routing, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, Split
from modkd_jax.methods.mind import block_size_of

PyTree = Any
ALLOCATIONS = ("entropy", "new")


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """Hyperparameters of a modular-experts run."""

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

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}")
        if min(self.epochs, self.batch_size, self.prototypes, self.top_k, len(self.hidden)) < 1:
            raise ValueError("epochs, batch_size, prototypes, top_k and len(hidden) must be at least 1")
        if not 0.0 <= self.radius_quantile <= 1.0 or not 0.0 <= self.reuse_threshold <= 1.0:
            raise ValueError("radius_quantile and reuse_threshold must lie in [0, 1]")
        if self.max_experts < 0 or self.embed_dim < 0:
            raise ValueError("max_experts and embed_dim must be non-negative")


# --- Pool and embedding --------------------------------------------------------------------------


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


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def spherical_kmeans(key: jax.Array, z: jax.Array, k: int, iters: int = 20) -> jax.Array:
    """``k`` unit centroids of unit vectors ``z`` (cosine k-means from ``k`` distinct random points)."""
    centroids = z[jax.random.choice(key, z.shape[0], (k,), replace=False)]

    def body(c, _):
        assign = jnp.argmax(z @ c.T, axis=1)
        sums = jax.ops.segment_sum(z, assign, k)
        sizes = jax.ops.segment_sum(jnp.ones(z.shape[0]), assign, k)
        return jnp.where(sizes[:, None] > 0, routing.l2_normalize(sums), c), None

    return jax.lax.scan(body, centroids, None, iters)[0]


def task_scores(emb: jax.Array, prototypes: jax.Array, seen: jax.Array) -> jax.Array:
    """Best cosine of every input to each task's prototypes: ``(B, T)``, ``-inf`` for unseen tasks."""
    T, K, d = prototypes.shape
    member = jnp.repeat(jnp.eye(T, dtype=bool) & seen[:, None], K, axis=1)  # task j owns its K prototypes
    return routing.prototype_scores(emb, prototypes.reshape(T * K, d), member)


def expert_prototypes(membership: jax.Array, k: int) -> jax.Array:
    """Which of the ``T * k`` prototypes each expert owns: ``(E, T * k)``, from ``membership (E, T)``."""
    return jnp.repeat(membership, k, axis=1)


def route_experts(router: PyTree, x_uint8: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(expert, task)`` per input: the expert with the most similar prototype and that prototype's task."""
    emb = embed(router["projection"], x_uint8)
    T, K, d = router["prototypes"].shape
    member = expert_prototypes(router["membership"] & router["seen"][None], K)
    expert = routing.route(emb, router["prototypes"].reshape(T * K, d), member)
    task = jnp.argmax(task_scores(emb, router["prototypes"], router["seen"]), axis=-1)
    return expert, task


def slot_weights(router: PyTree, emb: jax.Array, task, slots: jax.Array, top_k: int,
                 temperature: float) -> jax.Array:
    """Mixture weights ``(B, k)`` of the experts serving ``task``: soft top-k over their similarity to ``x``.

    Similarity counts the experts' *other* tasks' prototypes (what each already
    knows); an expert with no other task scores 0. A single expert gets weight 1.
    """
    T, K, d = router["prototypes"].shape
    others = router["membership"] & router["seen"][None] & (jnp.arange(T) != task)[None]
    scores = routing.prototype_scores(emb, router["prototypes"].reshape(T * K, d), expert_prototypes(others, K))
    s = jnp.take(scores, slots, axis=1)  # (B, k)
    return routing.soft_top_k(jnp.where(jnp.isfinite(s), s, 0.0), top_k, temperature)


def mix(logits: jax.Array, weights: jax.Array, task, block_size: int) -> jax.Array:
    """``log sum_s w_s softmax(block of logits[s])``: mixed class log-probabilities ``(B, block)``.

    ``logits (k, B, out)`` of the task's ``k`` experts, ``weights (B, k)``; zero weights drop out exactly.
    """
    logp = jax.nn.log_softmax(training.block(logits, task, block_size), axis=-1)
    on = (weights > 0).T[..., None]
    logw = jnp.log(jnp.where(weights > 0, weights, 1.0)).T[..., None]
    return jax.scipy.special.logsumexp(jnp.where(on, logp + logw, -jnp.inf), axis=0)


def mixture_log_probs(model, pool: PyTree, slots: jax.Array, weights: jax.Array, xf: jax.Array, task,
                      block_size: int) -> jax.Array:
    """The task's class log-probabilities ``(B, block)`` from its experts ``slots`` mixed by ``weights``."""
    sub = take({"params": pool["params"], "batch_stats": pool["batch_stats"]}, slots)
    logits = jax.vmap(lambda v: model.apply(v, xf, task, train=False))(sub)  # (k, B, out)
    return mix(logits, weights, task, block_size)


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


# --- Training ------------------------------------------------------------------------------------


def make_expert_step(model, cfg: ExpertsConfig, block_size: int, num_tasks: int, mean, std, tx,
                     distill: bool):
    """The pool's train step, with ``training.make_train_step``'s signature so ``training.run_phase`` drives it.

    ``route`` (the forward-mask slot) holds the router and the task's expert
    ``slots`` (their number is static: one compile per count); ``trn_mask`` gates the pool to those rows;
    ``teacher`` is the pool before the task (used when ``distill``: LwF on the
    reused experts' earlier tasks, ``route["old"] (k, T)``).
    """
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def step(carry, x, y, key, task, route, trn_mask, teacher):
        params, batch_stats, opt_state = carry
        xf = batching.augment(key, x, mean, std, False)
        slots = route["slots"]
        w = slot_weights(route["router"], embed(route["router"]["projection"], x), task, slots, cfg.top_k,
                         cfg.route_temperature)

        def loss_fn(p):
            sub_p, sub_bs = take(p, slots), take(batch_stats, slots)
            logits, new = jax.vmap(lambda pp, bb: model.apply({"params": pp, "batch_stats": bb}, xf, task,
                                                               train=True, mutable=["batch_stats"]))(sub_p, sub_bs)
            mixed = mix(logits, w, task, block_size)
            ce = -jnp.mean(jnp.take_along_axis(mixed, y[:, None], axis=1))
            extra = jnp.zeros(())
            if distill:
                old, t_sub = route["old"], take(teacher, slots)

                def kd_one(pp, bb, tv, j):
                    s = training.block(model.apply({"params": pp, "batch_stats": bb}, xf, j, train=False), j,
                                       block_size)
                    t = training.block(model.apply(tv, xf, j, train=False), j, block_size)
                    return losses.kd_kl(s, t, cfg.distill_temperature)

                tasks = jnp.arange(num_tasks)
                kd = jax.vmap(lambda pp, bb, tv: jax.vmap(lambda j: kd_one(pp, bb, tv, j))(tasks))(sub_p, sub_bs, t_sub)
                extra = jnp.sum(jnp.where(old, kd, 0.0)) / jnp.maximum(jnp.sum(old), 1)
            acc = jnp.mean(jnp.argmax(mixed, -1) == y)
            return ce + cfg.distill_beta * extra, (new["batch_stats"], {"ce": ce, "distill": extra, "acc": acc})

        (loss, (new_bs, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        batch_stats = jax.tree.map(lambda a, n: a.at[slots].set(n), batch_stats, new_bs)
        updates, opt_state = tx.update(grads, opt_state, params, mask=trn_mask)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), {"loss": loss, **metrics}

    return jax.jit(step, donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class Experts:
    """Everything static about a run: the expert network, compiled steps and evaluators."""

    cfg: ExpertsConfig
    scenario: Scenario
    model: Any
    block_size: int
    num_experts: int
    steps: dict[str, Callable]
    tx: Any
    route_fn: Callable
    probs_fn: Callable
    weights_fn: Callable

    @property
    def task_count(self) -> int:
        return self.scenario.task_count


def setup(cfg: ExpertsConfig, scenario: Scenario) -> Experts:
    """Expert network, compiled steps and evaluators for ``cfg`` on ``scenario``."""
    k, T = block_size_of(scenario), scenario.task_count
    model = models.build("mlp", k * T, T, hidden=tuple(cfg.hidden))
    E = cfg.max_experts or T
    mean, std = (tuple(float(v) for v in a) for a in scenario.norm)
    tx = training.make_optimizer(cfg.optimizer, cfg.lr)
    steps = {"plain": make_expert_step(model, cfg, k, T, mean, std, tx, distill=False),
             "distill": make_expert_step(model, cfg, k, T, mean, std, tx, distill=True)}
    mean_a, std_a = jnp.asarray(mean), jnp.asarray(std)

    @jax.jit
    def probs_fn(pool, router, x, task, slots):
        w = slot_weights(router, embed(router["projection"], x), task, slots, cfg.top_k, cfg.route_temperature)
        return jnp.exp(mixture_log_probs(model, pool, slots, w, batching.to_float(x, mean_a, std_a), task, k))

    @jax.jit
    def weights_fn(router, x, task, slots):
        return slot_weights(router, embed(router["projection"], x), task, slots, cfg.top_k, cfg.route_temperature)

    return Experts(cfg, scenario, model, k, E, steps, tx, jax.jit(route_experts), probs_fn, weights_fn)


def init_state(ex: Experts, key: jax.Array) -> PyTree:
    """The pool before any task: random experts, none active, no prototypes."""
    k_pool, k_proj = jax.random.split(key)
    params, batch_stats = init_pool(ex.model, k_pool, ex.scenario.input_shape, ex.num_experts)
    T, E, K = ex.task_count, ex.num_experts, ex.cfg.prototypes
    in_dim = int(np.prod(ex.scenario.input_shape))
    projection = random_projection(k_proj, in_dim, ex.cfg.embed_dim)
    d = ex.cfg.embed_dim or in_dim
    router = {"projection": projection, "prototypes": jnp.zeros((T, K, d), jnp.float32),
              "radius": jnp.full((T,), jnp.inf, jnp.float32), "membership": jnp.zeros((E, T), bool),
              "seen": jnp.zeros((T,), bool)}
    return {"params": params, "batch_stats": batch_stats, "router": router,
            "counts": jnp.zeros((E, T), jnp.float32), "active": jnp.zeros((E,), bool)}


def slots_of(membership: np.ndarray, task: int) -> np.ndarray:
    """The experts serving ``task`` (int32 ids)."""
    return np.flatnonzero(np.asarray(membership)[:, task]).astype(np.int32)


def stats_split(ex: Experts, task) -> Split:
    """Held-out inputs of a task for routing statistics (validation split, else the first training inputs)."""
    split = task.val if len(task.val) else task.train
    n = min(len(split), ex.cfg.stats_examples)
    return Split(split.x[:n], split.y[:n], split.y_global[:n])


_embed_jit = jax.jit(embed)


def _embed_all(projection, x: np.ndarray) -> jax.Array:
    """Embeddings of many images, 4096 at a time."""
    return jnp.concatenate([_embed_jit(projection, x[i:i + 4096]) for i in range(0, len(x), 4096)])


def routing_statistics(ex: Experts, state: PyTree, seen: int) -> np.ndarray:
    """``C (E, T)``: held-out inputs of each seen task routed to each expert.

    An input routed to a task that several experts share (they hold the same
    prototypes, a tie for ``argmax``) counts for each by its soft top-k weight.
    """
    E, T = ex.num_experts, ex.task_count
    membership = np.asarray(state["router"]["membership"])
    counts = np.zeros((E, T), np.float64)
    for j in range(seen):
        split = stats_split(ex, ex.scenario.tasks[j])
        for x, _, valid in training.pad_batches(split.x, split.y, ex.cfg.eval_batch_size):
            expert, task = (np.asarray(a) for a in ex.route_fn(state["router"], x))
            for r in np.unique(task[valid]):
                rows = valid & (task == r)
                slots = slots_of(membership, int(r))
                if len(slots) < 2:
                    counts[:, j] += np.bincount(expert[rows], minlength=E)
                    continue
                w = np.asarray(ex.weights_fn(state["router"], x, jnp.int32(r), jnp.asarray(slots)))
                counts[slots, j] += w[rows].sum(0)
    return counts


def learn_task(ex: Experts, state: PyTree, t: int, key: jax.Array, log: Callable[[dict], None] | None = None,
               progress: bool = True) -> tuple[PyTree, dict]:
    """Allocate experts for task ``t``, add its prototypes, train; returns the new state and a summary."""
    cfg, task = ex.cfg, ex.scenario.tasks[t]
    start = time.perf_counter()
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
    protos = spherical_kmeans(k_km, z, min(cfg.prototypes, len(z)), cfg.kmeans_iters)
    protos = jnp.concatenate([protos, jnp.repeat(protos[:1], cfg.prototypes - protos.shape[0], 0)])
    own = jnp.max(z @ protos.T, axis=1)
    old = membership[experts].copy()  # earlier tasks of the chosen experts (LwF when reused)
    membership[experts, t] = True
    active[experts] = True
    router.update(prototypes=router["prototypes"].at[t].set(protos),
                  radius=router["radius"].at[t].set(jnp.quantile(own, cfg.radius_quantile)),
                  membership=jnp.asarray(membership), seen=router["seen"].at[t].set(True))
    # 3. train the chosen experts on the task (soft top-k mixture when several)
    slots = slots_of(membership, t)  # == sorted(experts)
    old = old[np.argsort(experts)]
    distill = bool(old.any())
    route = {"router": router, "slots": jnp.asarray(slots), "old": jnp.asarray(old)}
    rows = np.isin(np.arange(ex.num_experts), experts)
    trn = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(rows).reshape((-1,) + (1,) * (a.ndim - 1)), a.shape),
                       state["params"])
    # a copy: the carry's buffers are donated to the step
    teacher = None
    if distill:
        teacher = jax.tree.map(jnp.copy, {"params": state["params"], "batch_stats": state["batch_stats"]})
    params, batch_stats = state["params"], state["batch_stats"]
    carry = (params, batch_stats, ex.tx.init(params))

    def tagged(m):
        if log is not None:
            log({"task": t, "phase": "train", **m})

    params, batch_stats, _ = training.run_phase(
        ex.steps["distill" if distill else "plain"], carry, task.train, epochs=cfg.epochs, batch_size=cfg.batch_size,
        base_lr=cfg.lr, milestone=cfg.lr_milestone, key=k_train, task=t, fwd_mask=route, trn_mask=trn,
        teacher_vars=teacher, desc=f"task {t} experts {experts}", log=tagged, progress=progress)
    state = {"params": params, "batch_stats": batch_stats, "router": router,
             "counts": state["counts"], "active": jnp.asarray(active)}
    counts = routing_statistics(ex, state, t + 1)
    state["counts"] = jnp.asarray(counts, jnp.float32)
    info = {"task": t, "experts": experts, "decision": decision, **alloc,
            "specialization": np.asarray(routing.specialization_entropy(counts)), "routing_counts": counts,
            "active_experts": int(active.sum()), "seconds": time.perf_counter() - start}
    return state, info


# --- Evaluation ----------------------------------------------------------------------------------


def _bucket(n: int, cap: int) -> int:
    """Padded size for a group of ``n`` rows: the next power of two (at least 8, at most ``cap``)."""
    return min(cap, max(8, 1 << (n - 1).bit_length()))


def predict(ex: Experts, state: PyTree, x: np.ndarray) -> dict[str, np.ndarray]:
    """Class-incremental prediction of one batch: route each input, run only its task's expert(s).

    Returns ``expert`` (routed), ``task`` (inferred), ``cls`` (local class) and
    ``activated`` (experts run) per input. Inputs are grouped by inferred task
    and each group runs padded to a power of two (few compiled shapes).
    """
    expert, task = (np.asarray(a) for a in ex.route_fn(state["router"], x))
    membership = np.asarray(state["router"]["membership"])
    cls = np.zeros(len(x), np.int32)
    activated = np.zeros(len(x), np.int32)
    pool = {"params": state["params"], "batch_stats": state["batch_stats"]}
    for j in np.unique(task):
        rows = np.flatnonzero(task == j)
        slots = jnp.asarray(slots_of(membership, int(j)))
        size = _bucket(len(rows), max(len(x), 8))
        for s in range(0, len(rows), size):
            part = rows[s:s + size]
            xb = np.zeros((size, *x.shape[1:]), x.dtype)
            xb[: len(part)] = x[part]
            p = ex.probs_fn(pool, state["router"], xb, jnp.int32(j), slots)
            cls[part] = np.asarray(jnp.argmax(p, -1))[: len(part)]
        activated[rows] = len(slots)
    return {"expert": expert, "task": task, "cls": cls, "activated": activated}


def evaluate(ex: Experts, state: PyTree, splits, seen: int, task_ids=None) -> dict[str, np.ndarray]:
    """Per split: ``til``, ``cil`` (right task and class), ``routing`` (routed to an expert of the true task),
    ``task_id`` (inferred task right) and ``activated`` (mean experts run per prediction)."""
    task_ids = range(len(splits)) if task_ids is None else list(task_ids)
    membership = np.asarray(state["router"]["membership"])
    pool = {"params": state["params"], "batch_stats": state["batch_stats"]}
    out: dict[str, list[float]] = {k: [] for k in ("til", "cil", "routing", "task_id", "activated")}
    batch_size = max(1, min(ex.cfg.eval_batch_size, max(len(s) for s in splits)))  # one shape, little padding
    for j, split in zip(task_ids, splits):
        if j >= seen or len(split) == 0:
            for k in out:
                out[k].append(np.nan)
            continue
        slots = jnp.asarray(slots_of(membership, j))
        tot = dict.fromkeys(out, 0.0)
        for x, y, v in training.pad_batches(split.x, split.y, batch_size):
            p = ex.probs_fn(pool, state["router"], x, jnp.int32(j), slots)
            tot["til"] += np.sum(v & (np.asarray(jnp.argmax(p, -1)) == y))
            pr = predict(ex, state, x)
            tot["cil"] += np.sum(v & (pr["task"] == j) & (pr["cls"] == y))
            tot["routing"] += np.sum(v & membership[pr["expert"], j])
            tot["task_id"] += np.sum(v & (pr["task"] == j))
            tot["activated"] += np.sum(np.where(v, pr["activated"], 0))
        for k in out:
            out[k].append(tot[k] / len(split))
    return {k: np.asarray(v, float) for k, v in out.items()}


# --- Compute per prediction ----------------------------------------------------------------------


def mlp_flops(in_dim: int, hidden, out_dim: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one MLP forward pass per example; norms, biases and ReLUs excluded."""
    dims = [in_dim, *hidden, out_dim]
    return int(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])))


def router_flops(in_dim: int, embed_dim: int, num_prototypes: int) -> int:
    """Matmul FLOPs per example of the router: the projection plus cosines to every stored prototype."""
    d = embed_dim or in_dim
    return 2 * in_dim * embed_dim + 2 * d * num_prototypes


def compiled_flops(fn: Callable, *args) -> float:
    """FLOPs XLA reports for ``jit(fn)(*args)`` (a cross-check of the analytic counts; loop-free code only)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


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


def make_distill_step(apply_new: Callable, apply_old: Callable, block_size: int, mean, std, tx, temperature: float):
    """Pure distillation step (no labels) of an old model's block into the new model's gated sub-network,
    with ``training.make_train_step``'s signature; the teacher slot holds the old variables."""
    mean, std = jnp.asarray(mean), jnp.asarray(std)

    def step(carry, x, y, key, task, fwd_mask, trn_mask, old_vars):
        params, batch_stats, opt_state = carry
        xf = batching.to_float(x, mean, std)
        t = jax.lax.stop_gradient(training.block(apply_old(old_vars, xf, task, train=False), task, block_size))

        def loss_fn(p):
            logits, new = apply_new({"params": masks.gate(p, fwd_mask), "batch_stats": batch_stats}, xf, task,
                                    train=True, mutable=["batch_stats"])
            z = training.block(logits, task, block_size)
            agree = jnp.mean(jnp.argmax(z, -1) == jnp.argmax(t, -1))
            return losses.kd_kl(z, t, temperature), (new["batch_stats"], {"acc": agree})

        (loss, (batch_stats, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, mask=trn_mask)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), {"loss": loss, **m}

    return jax.jit(step, donate_argnums=(0,))


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
    old_eval = training.make_dense_eval(old_model.apply, k, mean, std)
    new_eval = training.make_dense_eval(new_model.apply, k, mean, std)
    info = {"method": method, "importance": importance_kind, "keep": keep,
            "old_acc": training.dense_accuracy(old_eval, old_vars, old_t.test, old_task, eval_batch_size),
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
        step = make_distill_step(new_model.apply, old_model.apply, k, mean, std, tx, temperature)
        fwd, trn = masks.forward_mask(owner, old_task), masks.trainable_mask(owner, old_task)
        carry = (params, batch_stats, tx.init(params))
        params, batch_stats, _ = training.run_phase(
            step, carry, new_t.train, epochs=distill_epochs or epochs, batch_size=batch_size, base_lr=lr,
            milestone=0.7, key=k_dist, task=old_task, fwd_mask=fwd, trn_mask=trn, teacher_vars=old_vars,
            desc="distill old model", progress=progress)
    gated_now = {"params": masks.gate(params, masks.forward_mask(owner, old_task)), "batch_stats": batch_stats}
    info["transferred_acc"] = training.dense_accuracy(new_eval, gated_now, old_t.test, old_task, eval_batch_size)
    # continue learning: the new task takes every weight the old task does not own
    owner = masks.assign(owner, kinds, new_task, new_task + 1, policy="random", key=k_sel)
    spec = training.StepSpec(new_model.apply, k, mean, std, loss="ce")
    fwd, trn = masks.forward_mask(owner, new_task), masks.trainable_mask(owner, new_task)
    carry = (params, batch_stats, tx.init(params))
    params, batch_stats, _ = training.run_phase(
        training.make_train_step(spec, tx), carry, new_t.train, epochs=epochs, batch_size=batch_size, base_lr=lr,
        milestone=0.7, key=k_train, task=new_task, fwd_mask=fwd, trn_mask=trn, desc="continue", progress=progress)
    for name, t, split in (("retained_acc", old_task, old_t.test), ("new_task_acc", new_task, new_t.test)):
        v = {"params": masks.gate(params, masks.forward_mask(owner, t)), "batch_stats": batch_stats}
        info[name] = training.dense_accuracy(new_eval, v, split, t, eval_batch_size)
    info["retained_fraction"] = info["retained_acc"] / max(info["old_acc"], 1e-9)
    return info
