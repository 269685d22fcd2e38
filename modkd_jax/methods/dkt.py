"""DKT: distributed knowledge transfer between continual learners, decentralized.

Every learner is a ``TwoHead`` network: a shared feature extractor, a **CL head**
trained by cross-entropy on the learner's own current experience, and a
**student head** trained only to match a teacher's soft targets; the loss is
``L_cl + lam * L_kd`` (KD: ``T^2 * KL`` at temperature ``T``, or MSE between
softened probabilities). Both heads have one row per *global* class, so two
learners with different class orders speak the same output language.

Masking. The CL head sees the classes its learner has met so far (others get
``losses.MASK_VALUE``) in training and class-incremental evaluation. A
teacher's soft targets are its CL-head logits masked the same way; the student
head is trained on that support and evaluated class-incrementally over every
class any teacher has taught it ("taught"). Task-incremental accuracy takes the
argmax inside the task's own classes.

Agents. ``N`` learners are one pytree with a leading ``agents`` axis (params,
batch stats, optimizer state, inbox, exchange progress). The train step
(``training.make_step`` over ``make_loss`` and a ``Context``) is ``vmap``-ed over
that axis and jitted; with a mesh the *same* function runs inside ``shard_map``
over the ``agents`` mesh axis, with no communication. The only cross-agent
traffic is ``shift_agents``: ``jnp.roll`` when vmapped, ``jax.lax.ppermute``
inside ``shard_map`` when sharded (equal, tested).

Exchange modes (what travels, counted in bytes):
- ``probe``: each agent sends its CL-head logits on a shared unlabelled probe
  set, ``(n_probe, classes)`` float32 and nothing else. The probe images are
  drawn once (from the seed) out of the *training* pool and removed from every
  agent's training data; the test set is untouched.
- ``weights``: each agent sends its parameters, batch statistics and seen-class
  mask; the receiver runs the copy as teacher on its own batches.

``learner`` wraps a run as a ``modkd_jax.learner.Learner`` (``lead_axes=("agent",)``)
for ``modkd_jax.loop.run``; keys derive from the seed alone (``learner_key``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from modkd_jax import evaluation, losses, parallel, training
from modkd_jax.data import batching
from modkd_jax.data.scenarios import Scenario, Split, class_split
from modkd_jax.data.sources import Dataset
from modkd_jax.learner import Learner, scenario_fields
from modkd_jax.models import two_head

PyTree = Any
AXIS = parallel.AXES[0]  # "agents"
EXPERIMENTS = ("joint_teacher", "continual_teacher", "agents")
MODES = ("probe", "weights")
KD_LOSSES = ("kl", "mse")
TOPOLOGIES = ("ring", "gossip")
RULES = ("cl_cil", "student_cil", "cl_til", "student_til")  # accuracy of both heads of every agent
TEACHER_RULES = ("teacher_til", "teacher_cil")  # the teacher's CL head (teacher experiments, one agent)


@dataclasses.dataclass(frozen=True)
class DKTConfig:
    """Hyperparameters of a DKT run (defaults: MNIST-sized MLPs; ``PRESETS`` per dataset)."""

    experiment: str = "agents"  # one of EXPERIMENTS
    agents: int = 2  # learners in the agents experiment (>= 2); 1 (the student) otherwise
    backbone: str = "mlp"
    hidden: tuple[int, ...] = (400, 400)
    epochs: int = 2  # per experience, for every learner
    teacher_epochs: int = 2  # joint teacher (whole stream) or continual teacher (per experience)
    batch_size: int = 128
    probe_batch_size: int | None = None  # None: batch_size
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
        if self.probe_batch_size is None:
            object.__setattr__(self, "probe_batch_size", self.batch_size)
        if self.experiment != "agents":
            object.__setattr__(self, "agents", 1)  # one student, one teacher
        checks = [(self.experiment in EXPERIMENTS, f"unknown experiment {self.experiment!r}; expected one of "
                                                   f"{EXPERIMENTS}"),
                  (self.agents >= 2 or self.experiment != "agents",
                   f"the agents experiment needs at least 2 agents, got {self.agents}"),
                  (self.optimizer in ("adam", "sgd"), f"unknown optimizer {self.optimizer!r}; expected adam or sgd"),
                  (self.kd in KD_LOSSES, f"unknown kd loss {self.kd!r}; expected one of {KD_LOSSES}"),
                  (self.exchange in MODES, f"unknown exchange {self.exchange!r}; expected one of {MODES}"),
                  (self.topology in TOPOLOGIES, f"unknown topology {self.topology!r}; expected one of {TOPOLOGIES}"),
                  (self.backbone in two_head.BACKBONES, f"unknown backbone {self.backbone!r}; expected one of "
                                                        f"{two_head.BACKBONES}"),
                  (min(self.epochs, self.teacher_epochs, self.batch_size, self.probe_batch_size,
                       self.exchange_every, self.n_probe, self.eval_batch_size) >= 1,
                   "epochs, teacher_epochs, batch sizes, exchange_every and n_probe must be at least 1"),
                  (self.lam >= 0 and self.temperature > 0, "lam must be >= 0 and temperature > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# Per-dataset presets: DKTConfig fields plus the scenario's task count and validation share. Small MLPs on
# the 28x28 / 8x8 sets, ResNet-32 features on CIFAR. Adam at 1e-4 on (Fashion-)MNIST: at 1e-3 it pushes the
# rows of old classes down at full step size and the CL head's TIL accuracy falls to ~50% after 5 experiences.
_SCENARIO = dict(task_count=5, val_fraction=0.0)
_CIFAR = dict(_SCENARIO, backbone="resnet32", hidden=(), epochs=10, teacher_epochs=10, n_probe=2000, crop_flip=True)
PRESETS = {
    "mnist": dict(_SCENARIO, lr=1e-4),
    "fashion_mnist": dict(_SCENARIO, lr=1e-4),
    "digits": dict(_SCENARIO, hidden=(64, 64), epochs=5, teacher_epochs=5, batch_size=32, lr=2e-3, n_probe=200),
    "cifar10": _CIFAR,
    "cifar100": dict(_CIFAR, task_count=10),
}


def mode_name(cfg: DKTConfig) -> str:
    """``alone`` or the exchange mode."""
    return "alone" if cfg.alone or cfg.lam == 0 else cfg.exchange


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


def on_agents(fn: Callable, mesh: Mesh | None, n_agent_args: int, n_shared: int = 1,
              donate: tuple[int, ...] = ()) -> Callable:
    """``fn(*per_agent_args, *shared_args)`` vmapped over the agents axis, jitted; with a mesh, inside shard_map.

    The body is the same in both cases: shard_map only hands each device its
    block of agents. ``fn`` may not communicate across agents.
    """
    axes = (0,) * n_agent_args + (None,) * n_shared
    body = jax.vmap(fn, in_axes=axes)
    if mesh is not None:
        specs = tuple(P(AXIS) if a == 0 else P() for a in axes)
        body = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(AXIS))
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


# ---------------------------------------------------------------------------- the train step


class Batch(NamedTuple):
    """One agent's batch: its own uint8 images and global labels, and this step's probe-set rows."""

    x: jax.Array
    y: jax.Array
    probe: jax.Array  # int32 indices into the shared probe images (probe mode's distillation inputs)


class Inputs(NamedTuple):
    """What the loss sees: standardised (augmented) inputs, labels, distillation inputs, teacher logits."""

    x: jax.Array
    y: jax.Array
    kd_x: jax.Array  # the probe batch (probe mode) or ``x`` (weights mode)
    teacher: jax.Array  # the teacher's masked CL-head logits on ``kd_x`` (stop-gradient)


class Context(NamedTuple):
    """What one agent's step needs besides the batch: its classes, its inbox, the KD weight, the probe set."""

    seen: jax.Array  # [C] bool: classes the agent has met (the CL head's support)
    message: PyTree  # what arrived from the teacher (probe logits, or weights + seen mask)
    has_teacher: jax.Array  # float32: 0 until a message arrived
    lam: jax.Array  # float32: weight of the distillation loss
    probe_x: jax.Array  # uint8: the shared probe images


def cl_logits(model: two_head.TwoHead, variables: PyTree, xf: jax.Array, seen: jax.Array) -> jax.Array:
    """A network's CL-head logits, unseen classes masked: what a teacher says."""
    return losses.masked_logits(model.apply(variables, xf, train=False)[0], seen)


def make_prepare(cfg: DKTConfig, model: two_head.TwoHead, mean, std) -> Callable:
    """``prepare(batch, key, ctx) -> Inputs`` for ``training.make_step``: augmentation and teacher targets."""

    def prepare(batch: Batch, key: jax.Array, ctx: Context) -> Inputs:
        xf = batching.augment(key, batch.x, mean, std, cfg.crop_flip)
        if cfg.exchange == "probe":
            kd_xf = batching.to_float(ctx.probe_x[batch.probe], mean, std)
            teacher = ctx.message["logits"][batch.probe]
        else:
            kd_xf = xf
            teacher = cl_logits(model, {"params": ctx.message["params"], "batch_stats": ctx.message["batch_stats"]},
                                kd_xf, ctx.message["seen"])
        return Inputs(xf, batch.y, kd_xf, jax.lax.stop_gradient(teacher))

    return prepare


def make_loss(cfg: DKTConfig, model: two_head.TwoHead) -> Callable:
    """``loss(params, batch_stats, inputs, ctx)``: CE of the CL head + ``lam * KD`` of the student head."""

    def loss_fn(params, batch_stats, inputs: Inputs, ctx: Context):
        variables = {"params": params, "batch_stats": batch_stats}
        (z_cl, z_st), new = model.apply(variables, inputs.x, train=True, mutable=["batch_stats"])
        if cfg.exchange == "probe":  # its own forward, its BN statistics discarded: lam=0 == alone exactly
            (_, z_st), _ = model.apply(variables, inputs.kd_x, train=True, mutable=["batch_stats"])
        z_cl = losses.masked_logits(z_cl, ctx.seen)
        ce = losses.cross_entropy(z_cl, inputs.y)
        z_st = losses.masked_logits(z_st, inputs.teacher > losses.MASK_VALUE / 2)
        T = cfg.temperature
        kd = (losses.kd_kl(z_st, inputs.teacher, T) if cfg.kd == "kl"
              else losses.mse_soft_targets(z_st, inputs.teacher, T))
        loss = ce + ctx.lam * ctx.has_teacher * kd
        return loss, (new["batch_stats"], {"ce": ce, "kd": kd, "acc": jnp.mean(jnp.argmax(z_cl, -1) == inputs.y)})

    return loss_fn


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class World:
    """Everything static about a run: data, networks, compiled per-agent functions. Build once."""

    cfg: DKTConfig
    seed: int
    scenarios: tuple[Scenario, ...]  # one per learner (agents), or the student's alone
    probe_x: jax.Array  # uint8 on device (replicated), held out of every learner's training data
    probe_index: np.ndarray  # its rows in the dataset's original training split
    test: Split  # the whole test set (global labels)
    num_classes: int
    model: two_head.TwoHead
    mesh: Mesh | None
    fns: dict[str, Callable]

    @property
    def experiment(self) -> str:
        return self.cfg.experiment

    @property
    def agents(self) -> int:
        return len(self.scenarios)

    @property
    def task_count(self) -> int:
        return self.scenarios[0].task_count

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.scenarios[0].input_shape


def make_counts(model: two_head.TwoHead, mean, std) -> Callable:
    """``counts(learner, classes, seen, taught, x, y, valid, true_task, seen_count)`` of one agent.

    Per rule, correct counts ``[T]`` per task of the agent (``classes`` ``[T, k]``, its
    class order) on a batch of the test set, plus ``rows`` (examples per task).
    """

    def counts(learner, classes, seen, taught, x, y, valid, true_task, seen_count):
        del true_task, seen_count  # every task's rows at once; the masks say what was seen
        variables = {"params": learner["params"], "batch_stats": learner["batch_stats"]}
        cl, st = model.apply(variables, batching.to_float(x, mean, std), train=False)
        T, k = classes.shape
        task = jnp.zeros(cl.shape[-1], jnp.int32).at[classes.reshape(-1)].set(jnp.repeat(jnp.arange(T), k))[y]
        own = classes[task]  # [B, k]: the classes of each row's task, in the task's order
        rows = valid[:, None] & (task[:, None] == jnp.arange(T))  # [B, T]

        def per_task(correct):
            return jnp.sum(rows & correct[:, None], axis=0)

        def til(z):
            return jnp.take_along_axis(own, jnp.argmax(jnp.take_along_axis(z, own, 1), -1)[:, None], 1)[:, 0] == y

        def cil(z, mask):
            return jnp.argmax(jnp.where(mask, z, -jnp.inf), -1) == y

        return {"cl_til": per_task(til(cl)), "cl_cil": per_task(cil(cl, seen)), "student_til": per_task(til(st)),
                "student_cil": per_task(cil(st, taught)), "rows": jnp.sum(rows, axis=0)}

    return counts


@functools.lru_cache(maxsize=16)
def make_functions(cfg: DKTConfig, model: two_head.TwoHead, mean: tuple[float, ...], std: tuple[float, ...],
                   mesh: Mesh | None) -> dict[str, Callable]:
    """The per-agent train step, message and counts functions, on the agents axis.

    Cached: runs with equal settings (a resumed run) share one set of compiled functions.
    """
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    tx = optax.adam(cfg.lr) if cfg.optimizer == "adam" else optax.sgd(cfg.lr, momentum=0.9)
    step = training.make_step(make_loss(cfg, model), tx, make_prepare(cfg, model, mean, std), jit=False)

    def agent_step(learner, msg, has_teacher, data, shared):
        """One optimizer step of one agent on its own batch ``s`` of the experience (+ a probe batch)."""
        s = shared["s"]
        key = jax.random.fold_in(jax.random.wrap_key_data(data["key"]), s)
        rows = data["idx"][s]
        batch = Batch(data["x"][rows], data["y"][rows], data["pidx"][s])
        ctx = Context(data["seen"], msg, has_teacher, shared["lam"], shared["probe_x"])
        (params, bs, opt), metrics = step((learner["params"], learner["batch_stats"], learner["opt"]), batch, key,
                                          ctx)
        return {"params": params, "batch_stats": bs, "opt": opt}, metrics

    def message(learner, seen, shared):
        """What one agent sends: probe-set logits only (probe), or its weights and seen mask (weights)."""
        variables = {"params": learner["params"], "batch_stats": learner["batch_stats"]}
        if cfg.exchange == "probe":
            return {"logits": cl_logits(model, variables, batching.to_float(shared["probe_x"], mean, std), seen)}
        return jax.tree.map(jnp.copy, {**variables, "seen": seen})  # copies: the sender's buffers get donated

    return {"tx": tx,
            "step": on_agents(agent_step, mesh, 4, donate=(0,)),
            "message": on_agents(message, mesh, 2),
            "counts": on_agents(make_counts(model, mean, std), mesh, 4, n_shared=5)}


def setup(cfg: DKTConfig, ds: Dataset, task_count: int, *, seed: int = 0, devices: int = 1,
          val_fraction: float = 0.0) -> World:
    """Data (probe hold-out, one class order per learner), network and compiled functions of a run.

    Args:
      cfg: the run's hyperparameters (experiment and agent count included).
      ds: the dataset.
      task_count: experiences per learner.
      seed: class orders, probe set, initial weights, batches and gossip all derive from it.
      devices: devices the agents are sharded over (1: vmapped on one device).
      val_fraction: validation share held out of each task's training data.
    """
    devices = devices if cfg.experiment == "agents" else 1
    if devices > 1 and cfg.agents % devices:
        raise ValueError(f"{cfg.agents} agents cannot be split evenly over {devices} devices")
    rest, probe_x, probe_index = probe_holdout(ds, cfg.n_probe, seed)
    scenarios = tuple(agent_scenarios(rest, task_count, cfg.agents, seed, val_fraction))
    model = two_head.TwoHead(ds.num_classes, cfg.backbone, tuple(cfg.hidden))
    mesh = make_mesh(devices)
    mean, std = (tuple(float(v) for v in a) for a in scenarios[0].norm)
    probe_x = place(probe_x, mesh, shared=True)  # on device once, not copied into every step
    return World(cfg, seed, scenarios, probe_x, probe_index, Split(ds.test_x, ds.test_y, ds.test_y),
                 ds.num_classes, model, mesh, make_functions(cfg, model, mean, std, mesh))


def init_learners(world: World, keys: list[jax.Array]) -> PyTree:
    """Fresh learners (params, batch stats, optimizer state), one per key, stacked on the agents axis."""
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
    """The run's state before any experience: learners, inbox, exchange progress, (teacher runs) the teacher.

    ``progress`` holds the exchange rounds so far and the bytes each agent sent
    (int64 numpy, restored exactly by the loop's checkpoint).
    """
    learners = init_learners(world, [learner_key(world, 0, a) for a in range(world.agents)])
    state = {"learners": place(learners, world.mesh), "inbox": place(empty_inbox(world, learners), world.mesh),
             "progress": {"rounds": np.zeros((), np.int64), "bytes_sent": np.zeros(world.agents, np.int64)}}
    if world.experiment != "agents":
        teacher = init_learners(world, [learner_key(world, 1, 0)])
        state["teacher"] = place({"learners": teacher, "inbox": empty_inbox(world, teacher),
                                  "seen": np.zeros((1, world.num_classes), bool)}, None)
    return state


def epoch_inputs(world: World, data: dict, lam: float, rngs, keys, mesh: Mesh | None) -> tuple[dict, dict, int]:
    """``(per-agent step inputs, shared step inputs, steps)`` of one epoch: batch and probe indices, keys.

    The index arrays are padded to the steps of the longest experience: one compiled step per run.
    """
    idx = epoch_indices(data["n"], world.cfg.batch_size, rngs)
    steps = idx.shape[1]
    pidx = np.stack([rng.integers(0, len(world.probe_x), (steps, world.cfg.probe_batch_size)) for rng in rngs])
    pad = ((0, 0), (0, data["x"].shape[1] // world.cfg.batch_size - steps), (0, 0))
    per_agent = {"x": data["x"], "y": data["y"], "seen": data["seen"],
                 **place({"idx": np.pad(idx, pad), "pidx": np.pad(pidx.astype(np.int32), pad), "key": keys}, mesh)}
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
    return learners, {k: parallel.to_host(v) / steps for k, v in sums.items()}


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
        return parallel.to_host(message["logits"][:, 0, :] > losses.MASK_VALUE / 2)
    return parallel.to_host(message["seen"])


def receive(world: World, inbox: PyTree, message: PyTree, mesh: Mesh | None) -> PyTree:
    """The inbox after ``message`` (already routed to its receivers) arrives."""
    taught = parallel.to_host(inbox["taught"]) | support_of(world, message)
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


def learn_task(world: World, state: PyTree, t: int, log: Callable[[dict], None] | None = None
               ) -> tuple[PyTree, dict]:
    """Train experience ``t`` of every learner (and the teacher); returns the new state and the task's info."""
    cfg, start = world.cfg, time.perf_counter()
    A, C, T = world.agents, world.num_classes, world.task_count
    prog = {"rounds": int(state["progress"]["rounds"]), "bytes_sent": np.array(state["progress"]["bytes_sent"])}
    seen = np.stack([seen_mask(s, t, C) for s in world.scenarios])
    data = experience_data(world, [s.tasks[t].train for s in world.scenarios], seen, world.mesh)
    learners, inbox = state["learners"], state["inbox"]
    state = dict(state)
    lam = 0.0 if cfg.alone else cfg.lam

    def deliver(message, shift, epoch):
        per_agent = tree_bytes(message) // A
        prog["bytes_sent"] += per_agent
        prog["rounds"] += 1
        if log is not None:
            log({"task": t, "phase": "exchange", "epoch": epoch, "round": prog["rounds"], "shift": shift,
                 "bytes_per_agent": per_agent})

    if world.experiment == "agents":
        def after_epoch(e, learners, inbox):
            g = t * cfg.epochs + e  # exchange every `exchange_every` epochs, never after the very last
            if cfg.alone or (g + 1) % cfg.exchange_every or (t == T - 1 and e == cfg.epochs - 1):
                return inbox
            shift = round_shift(cfg.topology, A, world.seed, prog["rounds"])
            message = shift_agents(send(world, learners, seen, world.mesh), shift, world.mesh)
            deliver(message, shift, e)
            return receive(world, inbox, message, world.mesh)
    else:
        after_epoch = None
        teacher = state["teacher"]
        if world.experiment == "continual_teacher" or t == 0:  # refresh the teacher
            if world.experiment == "joint_teacher":  # trained once on every class of the stream
                t_split, t_seen = joint_split(world.scenarios[0]), np.ones((1, C), bool)
            else:  # a fine-tuning continual learner on the student's stream, one experience ahead
                t_split, t_seen = world.scenarios[0].tasks[t].train, seen
            t_data = experience_data(world, [t_split], t_seen, None)
            t_learners, _ = _fit(world, teacher["learners"], teacher["inbox"], t_data, epochs=cfg.teacher_epochs,
                                 lam=0.0, role=1, t=t, mesh=None, log=log, tag="teacher")
            state["teacher"] = {"learners": t_learners, "inbox": teacher["inbox"], "seen": place(t_seen, None)}
            if not cfg.alone:
                message = send(world, t_learners, t_seen, None)
                deliver(message, 0, -1)
                inbox = receive(world, inbox, message, None)
    learners, inbox = _fit(world, learners, inbox, data, epochs=cfg.epochs, lam=lam, role=0, t=t, mesh=world.mesh,
                           log=log, tag="train", after_epoch=after_epoch)
    state["learners"], state["inbox"] = jax.block_until_ready((learners, inbox))
    state["progress"] = {"rounds": np.asarray(prog["rounds"], np.int64), "bytes_sent": prog["bytes_sent"]}
    return state, {"task": t, "rounds": prog["rounds"], "bytes_sent": prog["bytes_sent"].tolist(),
                   "train_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------- evaluation


def head_rows(world: World, learners: PyTree, classes: np.ndarray, seen: np.ndarray, taught: np.ndarray,
              mesh: Mesh | None) -> dict[str, np.ndarray]:
    """Test accuracies ``[A, T]`` of both heads (TIL, CIL) of every learner (``evaluation.counts_per_split``).

    ``classes`` ``[A, T, k]`` is each learner's class order; class-incremental rules choose among
    ``seen`` (CL head) or ``taught`` (student head), NaN where that mask is empty.
    """
    args = (learners, *place((classes.astype(np.int32), seen, taught), mesh))
    [(c, _)] = evaluation.counts_per_split(world.fns["counts"], args, [world.test], 0, world.cfg.eval_batch_size)
    n = c.pop("rows")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {rule: np.asarray(v, float) / n for rule, v in c.items()}
    out["cl_cil"][~seen.any(-1)] = np.nan
    out["student_cil"][~taught.any(-1)] = np.nan
    out["student_til"][~taught.any(-1)] = np.nan
    return out


def classes_of(scenarios) -> np.ndarray:
    """``[A, T, k]`` class order of each learner's scenario."""
    return np.stack([np.stack([task.classes for task in s.tasks]) for s in scenarios])


def evaluate(world: World, state: PyTree, seen: int) -> dict[str, np.ndarray]:
    """Rows ``[A, T]`` after ``seen`` experiences for both heads of every learner, and ``[1, T]`` of the teacher.

    The student head is NaN while its agent has been taught nothing.
    """
    masks = np.stack([seen_mask(s, seen - 1, world.num_classes) for s in world.scenarios])
    out = head_rows(world, state["learners"], classes_of(world.scenarios), masks,
                    parallel.to_host(state["inbox"]["taught"]), world.mesh)
    if "teacher" in state:
        t_seen = np.asarray(state["teacher"]["seen"])
        rows = head_rows(world, state["teacher"]["learners"], classes_of(world.scenarios[:1]), t_seen,
                         np.zeros_like(t_seen), None)
        out.update({rule: rows[rule.replace("teacher", "cl")] for rule in TEACHER_RULES})
    return out


# ---------------------------------------------------------------------------- the Learner


def params_per_agent(state: PyTree) -> int:
    """Parameters of one learner (the agents axis dropped)."""
    return int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(state["learners"]["params"])))


def param_counts(state: PyTree) -> dict:
    """Parameters per agent (and of the teacher)."""
    out = {"per_agent": params_per_agent(state)}
    if "teacher" in state:
        out["teacher"] = params_per_agent(state["teacher"])
    return out


def report(world: World, state: PyTree, infos: list) -> dict:
    """DKT's part of results.json: experiment, exchange totals, probe set, each agent's class order."""
    del infos
    cfg, prog = world.cfg, state["progress"]
    rounds, sent = int(prog["rounds"]), [int(b) for b in prog["bytes_sent"]]
    return {
        "experiment": cfg.experiment, "mode": mode_name(cfg),
        "exchange": {"mode": cfg.exchange, "topology": cfg.topology, "rounds": rounds,
                     "bytes_per_agent_per_round": sent[0] // rounds if rounds else 0,
                     "bytes_sent_per_agent": sent, "bytes_total": sum(sent)},
        "probe": {"n_probe": len(world.probe_x), "source": "held out of the training split (test untouched)",
                  "rows": world.probe_index},
        "agents": [{"agent": a, "class_order_seed": order_seed(world.seed, a), "tasks": [t.name for t in s.tasks],
                    "classes": [t.classes for t in s.tasks]} for a, s in enumerate(world.scenarios)],
        "params_per_agent": params_per_agent(state),
    }


def describe(info: dict) -> str:
    """The per-task line's extra: bytes sent so far by agent 0."""
    return f"sent {info['bytes_sent'][0]:,} B/agent"


def learner(world: World) -> Learner:
    """DKT as a ``Learner``: agents on the leading axis of state and accuracy rows (``lead_axes=("agent",)``).

    Keys derive from ``world.seed`` (``learner_key``, ``epoch_keys``), not from the loop's keys,
    so a run's numbers depend on the seed only.
    """
    return Learner(
        name="dkt", rules=RULES + (TEACHER_RULES if world.experiment != "agents" else ()), lead_axes=("agent",),
        init_state=lambda key: init_state(world),
        learn_task=lambda state, t, key, log=None, progress=False: learn_task(world, state, t, log),
        evaluate=lambda state, seen: evaluate(world, state, seen),
        param_counts=param_counts,
        report=lambda state, infos: report(world, state, infos),
        describe=describe, **scenario_fields(world.scenarios[0]))
