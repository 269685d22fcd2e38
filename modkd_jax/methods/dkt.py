"""DKT: distributed knowledge transfer between continual learners, decentralized.

Every learner is a ``TwoHead`` network: a shared feature extractor, a **CL head**
trained by cross-entropy on the learner's own current experience, and a
**student head** trained only to match a teacher's soft targets; the loss is
``L_cl + lam * L_kd`` (KD: ``T^2 * KL`` at temperature ``T``, or MSE between
softened probabilities). Both heads have one row per *global* class, so two
learners with different class orders speak the same output language.

Masking. The CL head sees the classes its learner has met so far: logits of
classes not yet seen are set to ``losses.MASK_VALUE`` (probability 0) in
training and in class-incremental evaluation. A teacher's soft targets are its
CL-head logits masked the same way (its own seen classes); the student head is
trained on that support and evaluated class-incrementally over every class any
teacher has taught it ("taught"). Task-incremental accuracy takes the argmax
inside the task's own classes.

Agents. ``N`` learners are one pytree with a leading ``agents`` axis (params,
batch stats, optimizer state, inbox, data). One per-agent step is ``vmap``-ed
over that axis and jitted; with a mesh it is additionally wrapped in
``shard_map`` over the ``agents`` mesh axis, the *same* function, so each
device runs the vmapped step on its local agents with no communication. The
only cross-agent traffic is ``shift_agents``: ``jnp.roll`` when vmapped,
``jax.lax.ppermute`` inside ``shard_map`` when sharded (equal, tested). The step
takes no gradient collective, so the shard_map pitfall of a ``pmean`` over
gradients of replicated inputs (already summed) cannot arise.

Exchange modes (what travels, counted in bytes):
- ``probe``: each agent sends its CL-head logits on a shared unlabelled probe
  set, ``(n_probe, classes)`` float32 and nothing else. The probe images are
  drawn once (from the seed) out of the *training* pool and removed from every
  agent's training data; the test set is untouched. No raw data, labels or
  weights cross the agents axis.
- ``weights``: each agent sends its parameters, batch statistics and seen-class
  mask; the receiver runs the copy as teacher on its own batches (DKT's
  original behaviour).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modkd_jax import losses, parallel, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, Split, class_split
from modkd_jax.data.sources import Dataset
from modkd_jax.models import two_head

PyTree = Any
AXIS = parallel.AXES[0]  # "agents"
EXPERIMENTS = ("joint_teacher", "continual_teacher", "agents")
MODES = ("probe", "weights")
TOPOLOGIES = ("ring", "gossip")


@dataclasses.dataclass(frozen=True)
class DKTConfig:
    """Hyperparameters of a DKT run."""

    backbone: str = "mlp"
    hidden: tuple[int, ...] = (400, 400)
    epochs: int = 2  # per experience, for every learner
    teacher_epochs: int = 2  # joint teacher (whole stream) or continual teacher (per experience)
    batch_size: int = 128
    probe_batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    lam: float = 1.0  # weight of the distillation loss
    kd: str = "kl"  # "kl" (T^2 KL) | "mse" (soft targets)
    temperature: float = 2.0
    exchange: str = "probe"
    topology: str = "ring"  # ring: agent a learns from a+1; gossip: from a+s, s random per round
    exchange_every: int = 1  # epochs between exchange rounds (agents experiment)
    alone: bool = False  # no exchange at all: the "same agent trained alone" baseline
    n_probe: int = 1000
    crop_flip: bool = False
    eval_batch_size: int = 1000

    def __post_init__(self):
        checks = [(self.optimizer in ("adam", "sgd"), f"unknown optimizer {self.optimizer!r}; expected adam or sgd"),
                  (self.kd in ("kl", "mse"), f"unknown kd loss {self.kd!r}; expected 'kl' or 'mse'"),
                  (self.exchange in MODES, f"unknown exchange {self.exchange!r}; expected one of {MODES}"),
                  (self.topology in TOPOLOGIES, f"unknown topology {self.topology!r}; expected one of {TOPOLOGIES}"),
                  (self.backbone in two_head.BACKBONES, f"unknown backbone {self.backbone!r}"),
                  (min(self.epochs, self.teacher_epochs, self.batch_size, self.probe_batch_size,
                       self.exchange_every, self.n_probe) >= 1,
                   "epochs, teacher_epochs, batch sizes, exchange_every and n_probe must be at least 1"),
                  (self.lam >= 0 and self.temperature > 0, "lam must be >= 0 and temperature > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------------------- data


def probe_holdout(ds: Dataset, n_probe: int, seed: int) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """``(ds without the probe rows, probe images, probe row indices)``: an unlabelled probe set from train."""
    if not 0 < n_probe < len(ds.train_y) // 2:
        raise ValueError(f"n_probe must be in [1, {len(ds.train_y) // 2}) for {ds.name}, got {n_probe}")
    idx = np.sort(np.random.default_rng([seed, 7919]).choice(len(ds.train_y), n_probe, replace=False))
    keep = np.setdiff1d(np.arange(len(ds.train_y)), idx, assume_unique=True)
    rest = dataclasses.replace(ds, train_x=ds.train_x[keep], train_y=ds.train_y[keep])
    return rest, ds.train_x[idx], idx


def order_seed(seed: int, agent: int) -> int:
    """The class-order seed of ``agent`` (agent 0 of seed s has ``class_split``'s order for 1000*s)."""
    return 1000 * seed + agent


def agent_scenarios(ds: Dataset, task_count: int, agents: int, seed: int, val_fraction: float = 0.0
                    ) -> list[Scenario]:
    """One class-incremental scenario of ``ds`` per agent, each with its own class order."""
    return [class_split(ds, task_count, seed=order_seed(seed, a), val_fraction=val_fraction) for a in range(agents)]


def joint_split(scenario: Scenario) -> Split:
    """All training data of a scenario as one split (global labels), for the joint teacher."""
    parts = [t.train for t in scenario.tasks]
    yg = np.concatenate([p.y_global for p in parts])
    return Split(np.concatenate([p.x for p in parts]), yg, yg)


def seen_mask(scenario: Scenario, t: int, num_classes: int) -> np.ndarray:
    """Boolean ``[num_classes]``: the classes of tasks ``0..t``."""
    mask = np.zeros(num_classes, bool)
    for task in scenario.tasks[: t + 1]:
        mask[task.classes] = True
    return mask


def stack_splits(splits: list[Split], n_max: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [A, n_max, ...], y_global [A, n_max], n [A])``: one split per agent, zero-padded to one shape.

    A fixed ``n_max`` for a whole run keeps one compiled step for every experience.
    """
    n = np.array([len(s) for s in splits])
    n_max = int(n.max()) if n_max is None else n_max
    x = np.zeros((len(splits), n_max, *splits[0].x.shape[1:]), np.uint8)
    y = np.zeros((len(splits), n_max), np.int32)
    for a, s in enumerate(splits):
        x[a, : n[a]], y[a, : n[a]] = s.x, s.y_global
    return x, y, n


def epoch_indices(n: np.ndarray, batch_size: int, rngs: list[np.random.Generator]) -> np.ndarray:
    """``[A, S, B]`` example indices of one epoch; ``S = min(n) // B`` so every agent takes the same steps.

    Each agent draws a fresh permutation of its own examples; an agent with more
    examples than ``S * B`` uses a different random subset each epoch.
    """
    steps = int(n.min()) // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {int(n.min())} examples of an experience")
    return np.stack([rng.permutation(int(k))[: steps * batch_size].reshape(steps, batch_size)
                     for k, rng in zip(n, rngs)]).astype(np.int32)


# ---------------------------------------------------------------------------- agents axis


def make_mesh(devices: int) -> Mesh | None:
    """``parallel.make_mesh`` with ``devices`` rows on ``agents`` (data axis 1); None for 1 (plain vmap)."""
    if devices <= 1:
        return None
    if devices > jax.device_count():
        raise ValueError(f"asked for {devices} devices, {jax.device_count()} available")
    return parallel.make_mesh(data=1, agents=devices)


def place(tree: PyTree, mesh: Mesh | None, shared: bool = False) -> PyTree:
    """Put ``tree`` on device: its leading axis split over the mesh's agents (or replicated if ``shared``)."""
    if mesh is None:
        return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(mesh, P() if shared else P(AXIS)))


def on_agents(fn: Callable, mesh: Mesh | None, n_agent_args: int, donate: tuple[int, ...] = ()) -> Callable:
    """``fn(*per_agent_args, shared)`` vmapped over the agents axis, jitted; with a mesh, inside shard_map.

    The body is the same in both cases: shard_map only hands each device its
    block of agents. ``fn`` may not communicate across agents.
    """

    def body(*args):
        return jax.vmap(fn, in_axes=(0,) * n_agent_args + (None,))(*args)

    if mesh is not None:
        body = jax.shard_map(body, mesh=mesh, in_specs=(P(AXIS),) * n_agent_args + (P(),), out_specs=P(AXIS))
    return jax.jit(body, donate_argnums=donate)


def _roll(tree: PyTree, shift: int) -> PyTree:
    """``out[a] = tree[(a + shift) % A]`` along the leading axis."""
    return jax.tree.map(lambda x: jnp.roll(x, -shift, axis=0), tree)


def _ppermute_roll(x: jax.Array, shift: int, n_shards: int) -> jax.Array:
    """``_roll`` of one leaf from inside ``shard_map``: whole blocks by ppermute, the remainder by concat."""
    m = x.shape[0]  # agents per shard
    q, r = divmod(shift, m)

    def from_shard(k: int) -> jax.Array:  # shard d receives the block of shard d + k
        k %= n_shards
        if k == 0:
            return x
        return jax.lax.ppermute(x, AXIS, [((d + k) % n_shards, d) for d in range(n_shards)])

    first = from_shard(q)
    return first if r == 0 else jnp.concatenate([first[r:], from_shard(q + 1)[:r]], axis=0)


@functools.lru_cache(maxsize=None)
def _shifter(mesh: Mesh | None, shift: int) -> Callable:
    """The jitted exchange for one (mesh, shift); cached so each shift compiles once."""
    if mesh is None:
        return jax.jit(lambda tree: _roll(tree, shift))
    n = mesh.shape[AXIS]
    local = lambda tree: jax.tree.map(lambda x: _ppermute_roll(x, shift, n), tree)  # noqa: E731
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


def shift_agents(tree: PyTree, shift: int, mesh: Mesh | None) -> PyTree:
    """Agent ``a`` receives agent ``(a + shift) % A``'s slice of every leaf: the only cross-agent traffic."""
    agents = jax.tree.leaves(tree)[0].shape[0]
    return _shifter(mesh, int(shift) % agents)(tree)


def round_shift(topology: str, agents: int, seed: int, round_index: int) -> int:
    """Whose message each agent takes in a round: ring always ``a+1``; gossip ``a+s``, s in [1, A) drawn per round."""
    if topology == "ring" or agents == 2:
        return 1
    return int(np.random.default_rng([seed, 104729, round_index]).integers(1, agents))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every leaf of ``tree``."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class World:
    """Everything static about a run: data, networks, compiled per-agent functions. Build once."""

    cfg: DKTConfig
    experiment: str
    seed: int
    scenarios: tuple[Scenario, ...]  # one per learner (agents), or the student's alone
    probe_x: np.ndarray  # uint8, held out of every learner's training data
    probe_index: np.ndarray  # its rows in the dataset's original training split
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    model: two_head.TwoHead
    mesh: Mesh | None
    fns: dict[str, Callable]

    @property
    def agents(self) -> int:
        return len(self.scenarios)

    @property
    def task_count(self) -> int:
        return self.scenarios[0].task_count

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.scenarios[0].input_shape


@functools.lru_cache(maxsize=16)
def make_functions(cfg: DKTConfig, model: two_head.TwoHead, mean: tuple[float, ...], std: tuple[float, ...],
                   mesh: Mesh | None) -> dict[str, Callable]:
    """The per-agent train step, message and evaluation functions, on the agents axis.

    Cached: runs with equal settings (a resumed run, the alone/probe/weights
    comparison's repeats) share one set of compiled functions.
    """
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    tx = optax.adam(cfg.lr) if cfg.optimizer == "adam" else optax.sgd(cfg.lr, momentum=0.9)
    T = cfg.temperature

    def cl_logits(variables, xf, seen):
        """A network's CL-head logits, unseen classes masked: what a teacher says."""
        return losses.masked_logits(model.apply(variables, xf, train=False)[0], seen)

    def teacher_targets(msg, kd_xf, pidx):
        """The teacher's logits for the KD inputs, from what arrived in the inbox."""
        if cfg.exchange == "probe":
            return msg["logits"][pidx]
        return cl_logits({"params": msg["params"], "batch_stats": msg["batch_stats"]}, kd_xf, msg["seen"])

    def step(learner, msg, has_teacher, data, shared):
        """One optimizer step of one agent on its own batch (+ a probe batch in probe mode)."""
        params, bs, opt = learner["params"], learner["batch_stats"], learner["opt"]
        s = shared["s"]
        rows = data["idx"][s]
        key = jax.random.fold_in(jax.random.wrap_key_data(data["key"]), s)
        xf = batching.augment(key, data["x"][rows], mean, std, cfg.crop_flip)
        y = data["y"][rows]
        pidx = data["pidx"][s]
        kd_xf = batching.to_float(shared["probe_x"][pidx], mean, std) if cfg.exchange == "probe" else xf
        t_logits = jax.lax.stop_gradient(teacher_targets(msg, kd_xf, pidx))
        support = t_logits > losses.MASK_VALUE / 2

        def loss_fn(p):
            (z_cl, z_st), new = model.apply({"params": p, "batch_stats": bs}, xf, train=True, mutable=["batch_stats"])
            if cfg.exchange == "probe":  # its own forward, its BN statistics discarded: lam=0 == alone exactly
                (_, z_st), _ = model.apply({"params": p, "batch_stats": bs}, kd_xf, train=True,
                                           mutable=["batch_stats"])
            z_cl = losses.masked_logits(z_cl, data["seen"])
            ce = losses.cross_entropy(z_cl, y)
            z_st = losses.masked_logits(z_st, support)
            kd = losses.kd_kl(z_st, t_logits, T) if cfg.kd == "kl" else losses.mse_soft_targets(z_st, t_logits, T)
            loss = ce + shared["lam"] * has_teacher * kd
            return loss, (new["batch_stats"], {"loss": loss, "ce": ce, "kd": kd,
                                               "acc": jnp.mean(jnp.argmax(z_cl, -1) == y)})

        (_, (bs, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return {"params": optax.apply_updates(params, updates), "batch_stats": bs, "opt": opt}, metrics

    def message(learner, seen, shared):
        """What one agent sends: probe-set logits only (probe), or its weights and seen mask (weights)."""
        if cfg.exchange == "probe":
            xf = batching.to_float(shared["probe_x"], mean, std)
            return {"logits": cl_logits({"params": learner["params"], "batch_stats": learner["batch_stats"]},
                                        xf, seen)}
        return jax.tree.map(jnp.copy, {"params": learner["params"], "batch_stats": learner["batch_stats"],
                                       "seen": seen})  # copies: the sender's own buffers get donated

    def heads(learner, x):
        """Both heads' logits of one agent on a shared evaluation batch."""
        xf = batching.to_float(x, mean, std)
        return model.apply({"params": learner["params"], "batch_stats": learner["batch_stats"]}, xf, train=False)

    return {"tx": tx,
            "step": on_agents(step, mesh, 4, donate=(0,)),
            "message": on_agents(message, mesh, 2),
            "heads": on_agents(heads, mesh, 1)}


def setup(cfg: DKTConfig, ds: Dataset, task_count: int, *, experiment: str = "agents", agents: int = 2,
          seed: int = 0, devices: int = 1, val_fraction: float = 0.0) -> World:
    """Data (probe hold-out, one class order per learner), network and compiled functions of a run."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; expected one of {EXPERIMENTS}")
    if experiment == "agents" and agents < 2:
        raise ValueError(f"the agents experiment needs at least 2 agents, got {agents}")
    if experiment != "agents":
        agents, devices = 1, 1  # one student, one teacher
    if devices > 1 and agents % devices:
        raise ValueError(f"{agents} agents cannot be split evenly over {devices} devices")
    rest, probe_x, probe_index = probe_holdout(ds, cfg.n_probe, seed)
    scenarios = tuple(agent_scenarios(rest, task_count, agents, seed, val_fraction))
    model = two_head.TwoHead(ds.num_classes, cfg.backbone, tuple(cfg.hidden))
    mesh = make_mesh(devices)
    mean, std = (tuple(float(v) for v in a) for a in scenarios[0].norm)
    return World(cfg, experiment, seed, scenarios, probe_x, probe_index, ds.test_x, ds.test_y, ds.num_classes,
                 model, mesh, make_functions(cfg, model, mean, std, mesh))


def init_learners(world: World, keys: list[jax.Array]) -> PyTree:
    """Fresh learners (params, batch stats, Adam state), one per key, stacked on the agents axis."""
    per = [two_head.init(world.model, k, world.input_shape) for k in keys]
    params = jax.tree.map(lambda *a: np.stack(a), *[p for p, _ in per])
    bs = jax.tree.map(lambda *a: np.stack(a), *[b for _, b in per])
    opt = jax.vmap(world.fns["tx"].init)(params)
    return {"params": params, "batch_stats": bs, "opt": opt}


def empty_inbox(world: World, learners: PyTree) -> PyTree:
    """An inbox with nothing received: zero message of the right shape, no teacher, nothing taught."""
    A = jax.tree.leaves(learners)[0].shape[0]
    seen = np.zeros((A, world.num_classes), bool)
    shape = jax.eval_shape(world.fns["message"], learners, seen, {"probe_x": world.probe_x})
    return {"message": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shape),
            "has_teacher": np.zeros(A, np.float32), "taught": seen}


def learner_key(world: World, role: int, agent: int) -> jax.Array:
    """Init key of learner ``agent`` (role 0: agents/student, 1: teacher); independent of the agent count."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(world.seed), role), agent)


def init_state(world: World) -> PyTree:
    """The run's state before any experience: learners, their inbox, and (teacher runs) the teacher."""
    learners = init_learners(world, [learner_key(world, 0, a) for a in range(world.agents)])
    state = {"learners": place(learners, world.mesh), "inbox": place(empty_inbox(world, learners), world.mesh)}
    if world.experiment != "agents":
        teacher = init_learners(world, [learner_key(world, 1, 0)])
        state["teacher"] = place({"learners": teacher, "inbox": empty_inbox(world, teacher),
                                  "seen": np.zeros((1, world.num_classes), bool)}, None)
    return state


def epoch_inputs(world: World, data: dict, lam: float, rngs, keys, mesh: Mesh | None) -> tuple[dict, dict, int]:
    """``(per-agent step inputs, shared step inputs, steps)`` of one epoch: batch and probe indices, keys."""
    idx = epoch_indices(data["n"], world.cfg.batch_size, rngs)
    steps = idx.shape[1]
    pidx = np.stack([rng.integers(0, len(world.probe_x), (steps, world.cfg.probe_batch_size)) for rng in rngs])
    per_agent = {"x": data["x"], "y": data["y"], "seen": data["seen"],
                 **place({"idx": idx, "pidx": pidx.astype(np.int32), "key": keys}, mesh)}
    return per_agent, {"probe_x": world.probe_x, "lam": np.float32(lam), "s": np.int32(0)}, steps


def train_epoch(world: World, learners: PyTree, inbox: PyTree, data: dict, lam: float, rngs, keys,
                mesh: Mesh | None) -> tuple[PyTree, dict[str, np.ndarray]]:
    """One epoch for every agent at once; returns the learners and per-agent mean metrics ``{name: [A]}``."""
    per_agent, shared, steps = epoch_inputs(world, data, lam, rngs, keys, mesh)
    sums = None
    for s in range(steps):
        learners, m = world.fns["step"](learners, inbox["message"], inbox["has_teacher"], per_agent,
                                        {**shared, "s": np.int32(s)})
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    return learners, {k: np.asarray(v) / steps for k, v in sums.items()}


def epoch_rngs(world: World, role: int, agents: int, t: int, epoch: int) -> list[np.random.Generator]:
    """Host RNG of each agent's batches in one epoch: depends on (seed, role, agent, t, epoch) only."""
    return [np.random.default_rng([world.seed, role, a, t, epoch]) for a in range(agents)]


def epoch_keys(world: World, role: int, agents: int, t: int, epoch: int) -> np.ndarray:
    """Augmentation key data ``[A, 2]`` of each agent for one epoch."""
    return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(
        jax.random.fold_in(learner_key(world, role, a), t), 1000 + epoch))) for a in range(agents)])


def experience_data(world: World, splits: list[Split], seen: np.ndarray, mesh: Mesh | None) -> dict:
    """One experience's training data of every agent on device (agents axis), with their seen masks."""
    longest = max(len(task.train) for scen in world.scenarios for task in scen.tasks)
    x, y, n = stack_splits(splits, max(longest, max(len(s) for s in splits)))
    return {**place({"x": x, "y": y, "seen": seen}, mesh), "n": n}


def support_of(world: World, message: PyTree) -> np.ndarray:
    """``[A, C]`` classes each message's teacher knows (the classes its soft targets cover)."""
    if world.cfg.exchange == "probe":
        return np.asarray(message["logits"][:, 0, :] > losses.MASK_VALUE / 2)
    return np.asarray(message["seen"])


def receive(world: World, inbox: PyTree, message: PyTree, mesh: Mesh | None) -> PyTree:
    """The inbox after ``message`` (already routed to its receivers) arrives."""
    taught = np.asarray(inbox["taught"]) | support_of(world, message)
    A = taught.shape[0]
    return {"message": message, **place({"has_teacher": np.ones(A, np.float32), "taught": taught}, mesh)}


def send(world: World, learners: PyTree, seen: np.ndarray, mesh: Mesh | None) -> PyTree:
    """Every agent's outgoing message (agents axis)."""
    return world.fns["message"](learners, place(seen, mesh), {"probe_x": world.probe_x})


def _fit(world: World, learners, inbox, data, *, epochs, lam, role, t, mesh, log, tag, after_epoch=None):
    """``epochs`` epochs of one experience; ``after_epoch(epoch, learners, inbox) -> inbox`` runs between them."""
    A = jax.tree.leaves(learners)[0].shape[0]
    for e in range(epochs):
        learners, m = train_epoch(world, learners, inbox, data, lam, epoch_rngs(world, role, A, t, e),
                                  epoch_keys(world, role, A, t, e), mesh)
        if log is not None:
            log({"task": t, "phase": tag, "epoch": e, **{k: v.tolist() for k, v in m.items()}})
        if after_epoch is not None:
            inbox = after_epoch(e, learners, inbox)
    return learners, inbox


def learn_experience(world: World, state: PyTree, progress: dict, t: int,
                     log: Callable[[dict], None] | None = None) -> tuple[PyTree, dict, dict]:
    """Train experience ``t`` of every learner (and the teacher); returns ``(state, progress, info)``.

    ``progress`` is host bookkeeping kept in the checkpoint's metadata: exchange
    rounds so far and bytes sent per agent.
    """
    cfg, start = world.cfg, time.perf_counter()
    progress = {**progress, "bytes_sent": list(progress["bytes_sent"]), "rounds": progress["rounds"]}
    A, C, T = world.agents, world.num_classes, world.task_count
    seen = np.stack([seen_mask(s, t, C) for s in world.scenarios])
    data = experience_data(world, [s.tasks[t].train for s in world.scenarios], seen, world.mesh)
    learners, inbox = state["learners"], state["inbox"]
    state = dict(state)
    lam = 0.0 if cfg.alone else cfg.lam

    def deliver(message, shift, epoch):
        per_agent = tree_bytes(message) // A
        progress["bytes_sent"] = [b + per_agent for b in progress["bytes_sent"]]
        progress["rounds"] += 1
        if log is not None:
            log({"task": t, "phase": "exchange", "epoch": epoch, "round": progress["rounds"], "shift": shift,
                 "bytes_per_agent": per_agent})

    if world.experiment == "agents":
        def after_epoch(e, learners, inbox):
            g = t * cfg.epochs + e  # exchange every `exchange_every` epochs, never after the very last
            if cfg.alone or (g + 1) % cfg.exchange_every or (t == T - 1 and e == cfg.epochs - 1):
                return inbox
            shift = round_shift(cfg.topology, A, world.seed, progress["rounds"])
            message = shift_agents(send(world, learners, seen, world.mesh), shift, world.mesh)
            deliver(message, shift, e)
            return receive(world, inbox, message, world.mesh)
    else:
        after_epoch = None
        teacher = state["teacher"]
        refresh = world.experiment == "continual_teacher" or t == 0
        if refresh:
            if world.experiment == "joint_teacher":  # trained once on every class of the stream
                t_split, t_seen = joint_split(world.scenarios[0]), np.ones((1, C), bool)
            else:  # a fine-tuning continual learner on the student's stream, one experience ahead
                t_split, t_seen = world.scenarios[0].tasks[t].train, seen
            t_data = experience_data(world, [t_split], t_seen, None)
            t_learners, _ = _fit(world, teacher["learners"], teacher["inbox"], t_data, epochs=cfg.teacher_epochs,
                                 lam=0.0, role=1, t=t, mesh=None, log=log, tag="teacher")
            state["teacher"] = {"learners": t_learners, "inbox": teacher["inbox"], "seen": t_seen}
            if not cfg.alone:
                message = send(world, t_learners, t_seen, None)
                deliver(message, 0, -1)
                inbox = receive(world, inbox, message, None)
    learners, inbox = _fit(world, learners, inbox, data, epochs=cfg.epochs, lam=lam, role=0, t=t, mesh=world.mesh,
                           log=log, tag="train", after_epoch=after_epoch)
    state["learners"], state["inbox"] = jax.block_until_ready((learners, inbox))
    return state, progress, {"task": t, "seconds": time.perf_counter() - start}


def new_progress(agents: int) -> dict:
    """Bookkeeping before any exchange."""
    return {"rounds": 0, "bytes_sent": [0] * agents}


# ---------------------------------------------------------------------------- evaluation


def test_logits(world: World, learners: PyTree, mesh: Mesh | None) -> tuple[np.ndarray, np.ndarray]:
    """Both heads' logits ``[A, N_test, C]`` of every agent on the whole test set."""
    bsz = min(world.cfg.eval_batch_size, len(world.test_y))
    cl, st = [], []
    for x, _, valid in training.pad_batches(world.test_x, world.test_y, bsz):
        a, b = world.fns["heads"](learners, place(x, mesh, shared=True) if mesh is not None else x)
        cl.append(np.asarray(a)[:, valid])
        st.append(np.asarray(b)[:, valid])
    return np.concatenate(cl, 1), np.concatenate(st, 1)


def head_accuracy(logits: np.ndarray, y: np.ndarray, scenario: Scenario, mask: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per task of ``scenario``: (TIL accuracy, CIL accuracy over ``mask``); NaN where ``mask`` is empty/None."""
    til, cil = [], []
    masked = None if mask is None or not mask.any() else np.where(mask, logits, -np.inf).argmax(-1)
    for task in scenario.tasks:
        rows = np.isin(y, task.classes)
        within = task.classes[logits[rows][:, task.classes].argmax(-1)]
        til.append(np.mean(within == y[rows]))
        cil.append(np.nan if masked is None else np.mean(masked[rows] == y[rows]))
    return np.asarray(til), np.asarray(cil)


def evaluate(world: World, state: PyTree, t: int) -> dict[str, np.ndarray]:
    """Rows ``[A, T]`` after experience ``t`` for both heads (TIL, CIL) of every learner, and the teacher's.

    The student head is NaN while its agent has been taught nothing.
    """
    cl, st = test_logits(world, state["learners"], world.mesh)
    taught = np.asarray(state["inbox"]["taught"])
    rows: dict[str, list] = {k: [] for k in ("cl_til", "cl_cil", "student_til", "student_cil")}
    for a, scen in enumerate(world.scenarios):
        til, cil = head_accuracy(cl[a], world.test_y, scen, seen_mask(scen, t, world.num_classes))
        rows["cl_til"].append(til)
        rows["cl_cil"].append(cil)
        s_til, s_cil = head_accuracy(st[a], world.test_y, scen, taught[a])
        rows["student_til"].append(s_til if taught[a].any() else np.full_like(s_til, np.nan))
        rows["student_cil"].append(s_cil)
    out = {k: np.stack(v) for k, v in rows.items()}
    if "teacher" in state:
        tcl, _ = test_logits(world, state["teacher"]["learners"], None)
        til, cil = head_accuracy(tcl[0], world.test_y, world.scenarios[0], np.asarray(state["teacher"]["seen"])[0])
        out["teacher_til"], out["teacher_cil"] = til[None], cil[None]
    return out
