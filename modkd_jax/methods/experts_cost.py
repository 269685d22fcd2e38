"""Size and compute of the expert pool: parameters stored, matmul FLOPs per prediction (analytic and as XLA
counts them), for ``methods.experts``' report and parameter-matched comparisons."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np

from modkd_jax import models
from modkd_jax.data.scenarios import Scenario
from modkd_jax.methods.kit import block_size_of

if TYPE_CHECKING:
    from modkd_jax.methods.experts import ExpertsConfig


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
