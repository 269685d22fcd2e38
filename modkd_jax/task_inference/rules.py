"""The rule registry and the rules themselves: how much each input looks like each seen task, and the task
each rule infers, from every sub-network's outputs and the statistics kept per task."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from modkd_jax import gaussians, masks, routing

PyTree = Any
LOGITS, STATS, JOINT = "logits", "stats", "joint"  # what a rule reads (``Rule.reads``)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One task-inference rule of the registry: its name, what it reads and, for statistics, in what space.

    ``reads``: ``"logits"`` (every sub-network's class-block logits), ``"stats"`` (statistics kept per task,
    scored task by task) or ``"joint"`` (every seen sub-network at once). ``space``: the statistics' input,
    ``"pixels"``, ``"own"`` (the task's own sub-network's features) or ``"first"`` (sub-network 0's features).
    """

    name: str
    reads: str
    space: str | None = None
    standardised: bool = False  # scores as z-scores of the task's log-likelihood on its own training data

    @property
    def keys(self) -> tuple[str, str]:
        """Its results keys: class-incremental accuracy and task identification (``cil_<name>``, ``task_id_<name>``)."""
        return f"cil_{self.name}", f"task_id_{self.name}"


# The registry: the only source of rule names (and, through ``Rule.keys``, of their results keys).
REGISTRY = {r.name: r for r in (
    Rule("max_prob", LOGITS), Rule("top2_entropy", LOGITS), Rule("energy", LOGITS), Rule("entropy", LOGITS),
    Rule("entropy_grad", JOINT),
    Rule("gauss_input", STATS, "pixels"), Rule("gauss_own", STATS, "own"), Rule("gauss_first", STATS, "first"),
    Rule("prototype", STATS, "pixels"), Rule("gauss_own_z", STATS, "own", standardised=True),
)}
RULES = tuple(REGISTRY)
LOGIT_RULES = tuple(r for r in RULES if REGISTRY[r].reads == LOGITS)
STAT_RULES = tuple(r for r in RULES if REGISTRY[r].reads == STATS)
GAUSS_RULES = tuple(r for r in STAT_RULES if r.startswith("gauss_"))
SUBNET_RULES = RULES  # sub-networks of an owner map (MIND, PackNet): every rule
REPORTS = ("used", "all")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How a method infers the task of an input (the CLIs' ``--task_inference`` and ``--gauss_*`` flags)."""

    task_inference: str = "auto"  # a rule of RULES, or "auto": the best task identification on validation
    gauss_shrinkage: float = 0.2  # covariance shrunk this far toward its scaled identity
    gauss_rank: int = 30  # eigenvectors kept per covariance (0: the full covariance)
    gauss_components: int = 0  # Gaussians per class (k-means clusters); 0: 40 per task shared among its classes
    gauss_covariance: str = "component"  # one covariance per Gaussian, or one pooled per "task"
    prototypes: int = 10  # centroids per task of the prototype rule
    report_rules: str = "used"  # test accuracy of "used" (max_prob and the rule in use) or of "all" rules
    choice_examples: int = 1000  # auto scores the rules on this many validation examples per seen task (0: all)

    def __post_init__(self):
        if self.report_rules not in REPORTS:
            raise ValueError(f"unknown report_rules {self.report_rules!r}; expected one of {', '.join(REPORTS)}")
        if self.task_inference != "auto" and self.task_inference not in RULES:
            raise ValueError(f"unknown task inference rule {self.task_inference!r}; expected 'auto' or one of "
                             f"{', '.join(RULES)}")
        if not 0.0 <= self.gauss_shrinkage <= 1.0:
            raise ValueError(f"gauss_shrinkage must be in [0, 1], got {self.gauss_shrinkage}")
        if self.choice_examples < 0:
            raise ValueError(f"choice_examples must be >= 0 (0: every validation example), got {self.choice_examples}")
        if self.gauss_rank < 0 or self.gauss_components < 0 or self.prototypes < 1:
            raise ValueError("gauss_rank and gauss_components must be >= 0, prototypes >= 1")
        if self.gauss_covariance not in gaussians.COVARIANCES:
            raise ValueError(f"unknown gauss_covariance {self.gauss_covariance!r}; expected one of "
                             f"{', '.join(gaussians.COVARIANCES)}")

    def candidates(self, rules: tuple[str, ...]) -> tuple[str, ...]:
        """The rules that can be in use: every one of ``rules`` under ``auto``, else the configured one."""
        return tuple(rules) if self.task_inference == "auto" else (self.task_inference,)

    def reported(self, rules: tuple[str, ...]) -> tuple[str, ...]:
        """The rules whose accuracies a test evaluation reports beside the rule in use (``cil`` / ``task_id``):
        ``max_prob`` (the paper's rule), or every rule (``report_rules="all"``)."""
        return tuple(rules) if self.report_rules == "all" else tuple(r for r in rules if r == "max_prob")

    def fitted(self, rules: tuple[str, ...]) -> tuple[str, ...]:
        """The rules of ``rules`` whose statistics must be fitted: the candidates' and the reported ones'."""
        used = set(self.candidates(rules)) | set(self.reported(rules))
        return tuple(r for r in rules if r in used)

    def check(self, rules: tuple[str, ...], has_validation: bool) -> None:
        """Raise ValueError if the configured rule is not one of the method's, or auto lacks validation data.

        Args:
          rules: the method's rules.
          has_validation: whether the scenario holds validation splits (``val_fraction > 0``).
        """
        if self.task_inference != "auto" and self.task_inference not in rules:
            raise ValueError(f"task inference rule {self.task_inference!r} is not available here; expected 'auto' "
                             f"or one of {', '.join(rules)}")
        if self.task_inference == "auto" and not has_validation:
            raise ValueError("--task_inference auto chooses on the seen tasks' validation split: pass "
                             "--val_fraction > 0 or a fixed rule (e.g. --task_inference max_prob)")


def pixels(x_uint8: jax.Array) -> jax.Array:
    """The input space of the statistics: pixels in [0, 1], one row per image."""
    return x_uint8.reshape(x_uint8.shape[0], -1).astype(jnp.float32) / 255.0


def task_score(rule: str, stats: dict, z: jax.Array) -> jax.Array:
    """How much each row of ``z`` (the rule's space) looks like one task under the task's statistics: ``(B,)``.

    Args:
      rule: a statistics rule. Gaussian rules: ``log p(z | task)``, standardised by the task's own spread for
        ``standardised`` rules; ``prototype``: the best cosine to the task's centroids.
      stats: one task's statistics of the rule (Gaussians, or the prototype centroids ``(K, d)``).
      z: the inputs in the rule's space ``(B, d)``.
    """
    if rule == "prototype":
        return routing.prototype_scores(z, stats, jnp.ones((1, stats.shape[0]), bool))[:, 0]
    ll = gaussians.task_log_likelihood(stats, z)
    return (ll - stats["ll_mean"]) / stats["ll_std"] if REGISTRY[rule].standardised else ll


def superpose(params: PyTree, batch_stats: PyTree, owner: PyTree, kinds: PyTree, alpha: jax.Array):
    """Every sub-network of an owner map at once, sub-network t weighted ``alpha[t]`` (SupSup's superposition).

    Args:
      params: the parameters. A weight owned by task o computes in every sub-network t >= o, so it is scaled by
        ``sum_{t >= o} alpha_t``; per-task rows become their ``alpha``-weighted mix in every row.
      batch_stats: the per-task batch-norm rows, each row replaced by their ``alpha``-weighted mix.
      owner: the owner maps.
      kinds: the leaf kinds.
      alpha: the sub-networks' weights ``(T,)``.

    Returns:
      ``(params, batch_stats)`` of the superposed network.
    """
    coef = jnp.cumsum(alpha[::-1])[::-1]

    def mix_rows(a):
        return jnp.broadcast_to(jnp.tensordot(alpha, a, axes=1), a.shape)

    def leaf(p, o, kind):
        if kind == masks.PER_TASK:
            return mix_rows(p)
        return p * jnp.where(o >= 0, coef[jnp.clip(o, 0)], 0.0).astype(p.dtype)

    return jax.tree.map(leaf, params, owner, kinds), jax.tree.map(mix_rows, batch_stats)


def entropy_gradient(apply_fn: Callable, params: PyTree, batch_stats: PyTree, owner: PyTree, kinds: PyTree,
                     x: jax.Array, seen, task_count: int, block_size: int) -> jax.Array:
    """``dH_b / dalpha_t`` per example b and task t ``(B, T)``: SupSup's one-shot signal, forward-mode, per example.

    ``H_b`` is the entropy of the superposed network's softmax over the classes of
    the first ``seen`` tasks, at ``alpha_t = 1/seen`` for seen tasks (0 otherwise).

    Args:
      apply_fn: the model's ``apply(variables, x, task, train=False) -> logits``.
      params: the parameters.
      batch_stats: the batch statistics.
      owner: the owner maps.
      kinds: the leaf kinds.
      x: standardised inputs ``(B, ...)``.
      seen: the number of tasks learnt so far (may be traced).
      task_count: T, the sub-networks of the owner map.
      block_size: the classes per task.
    """
    seen_tasks = jnp.arange(task_count) < seen
    alpha0 = jnp.where(seen_tasks, 1.0 / seen, 0.0).astype(jnp.float32)
    seen_classes = jnp.repeat(seen_tasks, block_size)

    def entropy_of(alpha):
        p, bs = superpose(params, batch_stats, owner, kinds, alpha)
        z = apply_fn({"params": p, "batch_stats": bs}, x, 0, train=False)
        return routing.entropy(jax.nn.softmax(jnp.where(seen_classes, z, -jnp.inf), axis=-1))

    return jax.jacfwd(entropy_of)(alpha0)


def _on_tasks(fn: Callable, stats: PyTree, seen, *args) -> jax.Array:
    """``fn(stats of task t, *args of t)`` ``(B,)`` for every task, one after another (memory of one task),
    computed only for the first ``seen`` tasks (``-inf`` for the rest): ``(T, B)``."""
    T = jax.tree.leaves(stats)[0].shape[0]

    def one(a):
        t, st, rest = a[0], a[1], a[2:]
        return jax.lax.cond(t < seen, lambda: fn(st, *rest), lambda: jnp.full(batch, -jnp.inf, jnp.float32))

    batch = (jax.tree.leaves(args)[0].shape[1],)
    return jax.lax.map(one, (jnp.arange(T), stats, *args))


def scores(rule: str, logits: jax.Array, seen, *, tau=1.0, x=None, stats=None, features=None, grad=None,
           energy=None, task_scores: dict | None = None) -> jax.Array:
    """How much each input looks like each task under ``rule`` (higher is more): ``(T, B)``.

    Args:
      rule: a rule of ``RULES`` other than ``top2_entropy``.
      logits: every task's class-block logits ``(T, B, k)``.
      seen: tasks learnt so far (the statistics of later ones are not scored).
      tau: inference temperature of ``max_prob`` and ``entropy``.
      x: pixels in [0, 1] ``(B, d)`` (``gauss_input``, ``prototype``).
      stats: the fitted statistics (``init_stats``).
      features: every sub-network's features ``(T, B, h)`` (``gauss_own``, ``gauss_first``).
      grad: ``entropy_gradient``'s ``(B, T)``.
      energy: per-task free energy ``(T, B)`` where a task's logits are a mixture (experts).
      task_scores: ``{rule: (T, B)}`` scores already computed task by task (``subnet_eval``), used as they are.
    """
    if task_scores is not None and rule in task_scores:
        return task_scores[rule]
    if rule == "max_prob":
        return jnp.max(jax.nn.softmax(logits / tau, axis=-1), axis=-1)
    if rule == "energy":
        return jax.nn.logsumexp(logits, axis=-1) if energy is None else energy
    if rule == "entropy":
        return -routing.entropy(jax.nn.softmax(logits / tau, axis=-1))
    if rule == "entropy_grad":
        return -grad.T
    space = REGISTRY[rule].space
    if rule in GAUSS_RULES and space == "own":  # every task in its own sub-network's features
        return _on_tasks(lambda s, f: task_score(rule, s, f), stats[rule], seen, features)
    if rule in GAUSS_RULES:  # one space for every task
        z = x if space == "pixels" else features[0]
        return _on_tasks(lambda s, _: task_score(rule, s, z), stats[rule], seen, logits)
    if rule == "prototype":
        T, K, d = stats[rule].shape
        member = jnp.repeat(jnp.eye(T, dtype=bool), K, axis=1)
        return routing.prototype_scores(x, stats[rule].reshape(T * K, d), member).T
    raise ValueError(f"rule {rule!r} has no per-task score")


def best_seen(score: jax.Array, seen) -> jax.Array:
    """Per input, the seen task (among the first ``seen``) with the highest score: ``(B,)``.

    Args:
      score: ``(T, B)`` scores (``scores``); NaN never wins.
      seen: the number of tasks learnt so far (may be traced).
    """
    valid = (jnp.arange(score.shape[0]) < seen)[:, None]
    return jnp.argmax(jnp.where(valid & ~jnp.isnan(score), score, -jnp.inf), axis=0)


def infer(rules: Iterable[str], logits: jax.Array, seen, **kwargs) -> dict[str, jax.Array]:
    """``{rule: inferred task (B,)}`` for every rule, from one batch's outputs (``scores``' keyword arguments;
    ``grad`` may be a function computing ``entropy_gradient``, called only if ``entropy_grad`` is asked for).

    Args:
      rules: the rules to run.
      logits: every task's class-block logits ``(T, B, k)``.
      seen: the number of tasks learnt so far (may be traced).
      **kwargs: ``scores``' keyword arguments (``tau``, ``x``, ``stats``, ``features``, ``grad``, ...).
    """
    out = {}
    for rule in rules:
        if rule == "top2_entropy":
            out[rule] = routing.entropy_top2_task(jax.nn.softmax(logits / kwargs.get("tau", 1.0), axis=-1), seen)
        else:
            kw = dict(kwargs)
            if rule == "entropy_grad" and callable(kw.get("grad")):
                kw["grad"] = kw["grad"]()
            out[rule] = best_seen(scores(rule, logits, seen, **kw), seen)
    return out


def infer_in_use(rules: tuple[str, ...], chosen, logits: jax.Array, seen, known: dict | None = None,
                 **kwargs) -> jax.Array:
    """The task (B,) inferred by ``rules[chosen]`` (``chosen`` traced): only that rule runs (``lax.switch``).

    Args:
      rules: the candidate rules.
      chosen: the index of the rule in use (may be traced; clipped into range).
      logits: every task's class-block logits ``(T, B, k)``.
      seen: the number of tasks learnt so far.
      known: tasks already inferred in this pass (``infer``'s output), reused instead of recomputed.
      **kwargs: ``scores``' keyword arguments, as for ``infer``.
    """
    known = known or {}

    def branch(rule):
        if rule in known:
            return lambda: known[rule].astype(jnp.int32)
        return lambda: infer((rule,), logits, seen, **kwargs)[rule].astype(jnp.int32)

    if len(rules) == 1:
        return branch(rules[0])()
    return jax.lax.switch(jnp.clip(chosen, 0, len(rules) - 1), [branch(r) for r in rules])


def correct_counts(task: jax.Array, cls: jax.Array, y: jax.Array, valid: jax.Array, true_task
                   ) -> tuple[jax.Array, jax.Array]:
    """``(cil, task_id)`` correct counts of one rule's inferred ``task`` (B,); ``cls`` every task's class (T, B).

    Args:
      task: the inferred task per example ``(B,)``.
      cls: every task's predicted task-local class ``(T, B)``.
      y: the task-local labels ``(B,)``.
      valid: the rows that count ``(B,)``.
      true_task: the batch's task.
    """
    right = valid & (task == true_task)
    return jnp.sum(right & (cls[task, jnp.arange(y.shape[0])] == y)), jnp.sum(right)


def rule_counts(tasks: dict[str, jax.Array], cls: jax.Array, y: jax.Array, valid: jax.Array, true_task,
                chosen=None) -> dict[str, jax.Array]:
    """Correct counts per rule: ``cil_<rule>`` (right task and class) and ``task_id_<rule>``; with ``chosen`` (an
    index into ``tasks``' order) also ``cil`` / ``task_id`` of the rule in use.

    Args:
      tasks: ``{rule: inferred task (B,)}`` (``infer``).
      cls: every task's predicted task-local class ``(T, B)``.
      y: the task-local labels ``(B,)``.
      valid: the rows that count ``(B,)``.
      true_task: the batch's task.
      chosen: the rule in use's index into ``tasks`` (may be traced); None: no ``cil`` / ``task_id``.
    """
    out = {}
    for rule, task in tasks.items():
        cil, task_id = REGISTRY[rule].keys
        out[cil], out[task_id] = correct_counts(task, cls, y, valid, true_task)
    if chosen is not None:
        keys = [REGISTRY[r].keys for r in tasks]
        out["cil"] = jnp.stack([out[c] for c, _ in keys])[chosen]
        out["task_id"] = jnp.stack([out[i] for _, i in keys])[chosen]
    return out


def choose(task_id: dict[str, float], rules: tuple[str, ...]) -> str:
    """The rule with the best task identification (``{rule: accuracy}``, validation data); ties: the earlier.

    Args:
      task_id: ``{rule: task-identification accuracy}`` on validation data.
      rules: the candidates, in order of preference on ties.
    """
    best = max(task_id[r] for r in rules)
    return next(r for r in rules if task_id[r] == best)


def result_rules(rules: Iterable[str]) -> tuple[str, ...]:
    """The accuracy rules a method with these inference rules reports (what ``rule_counts`` returns)."""
    rules = tuple(rules)
    return ("cil", "task_id") + tuple(REGISTRY[r].keys[0] for r in rules) + tuple(REGISTRY[r].keys[1] for r in rules)
