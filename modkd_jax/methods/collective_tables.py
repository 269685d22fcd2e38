"""Collective distillation's joint score tables: one MIND learner's scores on the probe set, the top-k messages
that carry them, their merge, and the two exchanges (top-k entries or whole models) that move them between agents."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from modkd_jax import evaluation, routing, task_inference
from modkd_jax.agents import place, round_shift, shift_agents, tree_bytes
from modkd_jax.data import batching
from modkd_jax.methods.kit import norm_of

if TYPE_CHECKING:
    from modkd_jax.methods.collective import World
    from modkd_jax.methods.mind import Mind

PyTree = Any
NEG = -jnp.inf


def make_table(m: Mind, classes: np.ndarray, num_classes: int) -> Callable:
    """``table(params, batch_stats, owner, inference, x, seen) -> (B, C)``: one MIND learner's joint scores.

    ``log p(x | t) + log softmax(z_t(x))`` for the classes of its first ``seen`` tasks, ``-inf`` elsewhere.
    """
    mean, std = norm_of(m.scenario, jnp.float32)
    cols = jnp.asarray(classes.reshape(-1), jnp.int32)
    T, k = classes.shape

    @jax.jit
    def table(params, batch_stats, owner, inference, x, seen):
        logits = routing.subnet_logits(m.student.apply, params, batch_stats, owner, batching.to_float(x, mean, std),
                                       T, k)
        density = task_inference.scores("gauss_input", logits, seen, x=task_inference.pixels(x), stats=inference)
        joint = density[..., None] + jax.nn.log_softmax(logits, axis=-1)  # (T, B, k)
        joint = jnp.where((jnp.arange(T) < seen)[:, None, None], joint, NEG)
        return jnp.full((x.shape[0], num_classes), NEG).at[:, cols].set(
            jnp.transpose(joint, (1, 0, 2)).reshape(x.shape[0], T * k))

    return table


def model_of(state: PyTree) -> PyTree:
    """What the weights exchange sends of a MIND learner: everything its table needs (weights, owner map,
    batch statistics and its pixel Gaussians)."""
    return {"params": state["params"], "batch_stats": state["batch_stats"], "owner": state["owner"],
            "inference": {"gauss_input": state["inference"]["gauss_input"]}}


def table_of(table: Callable, model: PyTree, x: np.ndarray, seen: int, batch_size: int) -> np.ndarray:
    """``table`` of ``model`` on every image of ``x`` (``evaluation.features_of``'s padded batches): ``(n, C)``."""
    return np.asarray(evaluation.features_of(table, (model["params"], model["batch_stats"], model["owner"],
                                                     model["inference"]), x, seen, batch_size))


def top_k_message(table: jax.Array, k: int) -> dict[str, jax.Array]:
    """What a probe-mode agent sends: per probe image its ``k`` best classes (uint8) and scores (float16)."""
    scores, classes = jax.lax.top_k(table, k)
    return {"classes": classes.astype(jnp.uint8), "scores": scores.astype(jnp.float16)}


def dense(message: dict[str, jax.Array], num_classes: int) -> jax.Array:
    """A message as a ``(n, C)`` table (``-inf`` where it says nothing)."""
    n = message["classes"].shape[0]
    rows = jnp.arange(n)[:, None]
    return jnp.full((n, num_classes), NEG).at[rows, message["classes"].astype(jnp.int32)].max(
        message["scores"].astype(jnp.float32))


def merge(table: jax.Array, received: jax.Array, own: jax.Array, own_table: jax.Array) -> jax.Array:
    """An agent's table after a message: its own classes from its own learner, the rest the best known."""
    return jnp.where(own, own_table, jnp.maximum(table, received))


def own_tables(world: World, agents: list, learnt: list[int], x: np.ndarray) -> np.ndarray:
    """``[A, n, C]``: every agent's own joint scores on ``x`` (``-inf`` outside its learnt classes)."""
    return np.stack([table_of(world.tables[a], model_of(agents[a]), x, learnt[a], world.cfg.eval_batch_size)
                     for a in range(world.agents)])


def exchange_probe(world: World, table: jax.Array, own: np.ndarray, own_table: np.ndarray, hop0: int,
                   trace: list | None = None) -> tuple[jax.Array, np.ndarray]:
    """``hops_per_round`` hops of top-k messages on the agents axis; returns the table and bytes sent per agent.

    ``trace`` (tests) receives every message as it crossed.
    """
    A, mesh = world.agents, world.mesh
    own_d, own_table_d = place(own, mesh), place(own_table, mesh)
    table = place(np.where(own[:, None, :], own_table, np.asarray(table)).astype(np.float32), mesh)
    sent = np.zeros(A, np.int64)
    for h in range(world.cfg.hops_per_round):
        shift = round_shift(world.cfg.topology, A, world.seed, hop0 + h)
        message = shift_agents(world.fns["send"](table, {}), shift, mesh)
        if trace is not None:
            trace.append(jax.tree.map(np.asarray, message))
        sent += tree_bytes(message) // A
        table = world.fns["receive"](table, message, own_d, own_table_d, {})
    return table, sent


def exchange_weights(world: World, table: np.ndarray, agents: list, own: np.ndarray, own_table: np.ndarray,
                     hop0: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights baseline: each hop, every agent forwards every model it holds; receivers compute their tables.

    A received model is its origin's own learner, so the receiver's table of it is ``own_table[origin]``
    (the same compiled function on the same probe set): it is read, not recomputed.
    """
    A = world.agents
    held = [{a: model_of(agents[a])} for a in range(A)]
    sent = np.zeros(A, np.int64)
    table = np.array(table)
    for h in range(world.cfg.hops_per_round):
        shift = round_shift(world.cfg.topology, A, world.seed, hop0 + h)
        incoming = [dict(held[(a + shift) % A]) for a in range(A)]
        for a in range(A):
            src = (a + shift) % A
            sent[src] += sum(tree_bytes(m) for m in incoming[a].values())
            for origin in incoming[a]:
                if origin != a and origin not in held[a]:
                    table[a] = np.maximum(table[a], own_table[origin])
            held[a].update(incoming[a])
        table = np.where(own[:, None, :], own_table, table)
    return table, sent
