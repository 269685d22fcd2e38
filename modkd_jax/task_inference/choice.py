"""The rule in use: task t's statistics fitted when it ends (its training split only), the rule chosen on
the seen tasks' validation splits (``auto``), and what results.json reports of both."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from modkd_jax.evaluation import Placed, features_of
from modkd_jax.task_inference.rules import REGISTRY, STAT_RULES, SUBNET_RULES, InferenceConfig, choose, pixels
from modkd_jax.task_inference.stats import bytes_per_task, fit_task


def head(splits, n: int):
    """The first ``n`` rows of each split (all of them for 0): a ``Placed`` or a list of ``Split``s.

    Args:
      splits: a ``Placed`` (same device buffers, fewer rows) or a list of ``Split``s.
      n: the rows kept per split (0: all).
    """
    if isinstance(splits, Placed):
        return splits.head(n)
    return [s if n == 0 else dataclasses.replace(s, x=s.x[:n], y=s.y[:n], y_global=s.y_global[:n]) for s in splits]


def choose_rule(cfg: InferenceConfig, rules: tuple[str, ...], per_split: Callable, splits
                ) -> tuple[int, dict]:
    """The task-inference rule in use: ``(index into rules, info)``.

    A fixed rule is used as configured; ``auto`` takes the rule with the best task identification
    (``task_id_<rule>``) on ``splits``.

    Args:
      cfg: the task-inference settings (``task_inference``, ``choice_examples``).
      rules: the candidate rules.
      per_split: ``per_split(splits) -> [(counts, examples)]`` per split, counts holding ``task_id_<rule>``.
      splits: the seen tasks' validation splits (never a test split), each cut here to its first
        ``cfg.choice_examples`` rows (``head``).
    """
    if cfg.task_inference != "auto":
        return rules.index(cfg.task_inference), {"rule": cfg.task_inference}
    counted = per_split(head(splits, cfg.choice_examples))
    examples = sum(n for _, n in counted)
    if examples == 0:
        raise ValueError("choosing the task-inference rule needs validation examples")
    val = {r: float(sum(c[REGISTRY[r].keys[1]] for c, n in counted if n)) / examples for r in rules}
    rule = choose(val, rules)
    return rules.index(rule), {"rule": rule, "val_task_id": val}


def update_subnet_inference(cfg: InferenceConfig, inference, scenario, t: int, train, val: Placed,
                            features: Callable, evaluator, args: tuple, batch_size: int, key: jax.Array, tau):
    """``(inference, info)`` after task ``t`` of a sub-network method: t's statistics fitted from its training
    split only, then the rule in use chosen on the seen tasks' validation splits (``choose_rule``).

    Args:
      cfg: the task-inference settings.
      inference: the statistics so far (``task_inference.init_stats``).
      scenario: the tasks (class counts).
      t: the task that just ended.
      train: its training split (a ``training.DeviceSplit`` or a host ``Split``).
      val: the seen tasks' validation splits.
      features: ``make_subnet_features``'s function.
      evaluator: the method's ``subnet_eval.SubnetEvaluator``.
      args: the sub-networks' ``(params, batch_stats, owner)``.
      batch_size: batch of the feature passes.
      key: PRNG key of the fits.
      tau: the inference temperature.
    """
    inference = _fit_subnet_statistics(cfg, inference, scenario, t, train, features, args, batch_size, key)
    candidates = cfg.candidates(SUBNET_RULES)
    rule, info = choose_rule(cfg, candidates, lambda s: evaluator.counts((*args, inference), s, t + 1,
                                                                         rules=candidates, tau=tau), val)
    return {**inference, "rule": jnp.int32(rule)}, info


def _fit_subnet_statistics(cfg: InferenceConfig, inference, scenario, t: int, train,
                           features: Callable, args: tuple, batch_size: int, key: jax.Array):
    """Task ``t``'s task-inference statistics from its training split only, on the device (padded rows masked)."""
    if not any(r in inference for r in SUBNET_RULES):
        return inference  # no rule in use keeps statistics
    x, y = jnp.asarray(train.x), jnp.asarray(train.y)
    valid = jnp.arange(x.shape[0]) < len(train)
    spaces = {REGISTRY[r].space for r in STAT_RULES if r in inference}
    kwargs = {"x": pixels(x)} if "pixels" in spaces else {}  # an (n, d) float copy only when a rule reads it
    if "own" in spaces:
        kwargs["own"] = features_of(features, args, x, t, batch_size)
    if "first" in spaces:
        kwargs["first"] = features_of(features, args, x, 0, batch_size)
    return fit_task(cfg, inference, t, y, len(scenario.tasks[t].classes), valid=valid, key=key, **kwargs)


def inference_report(inference, rules: tuple[str, ...], infos: list[dict]) -> dict:
    """results.json's ``task_inference``: the rule in use after each task, its validation evidence, bytes per task.

    Args:
      inference: the final task-inference statistics (``init_stats``).
      rules: the candidate rules.
      infos: the per-task infos, each with the ``task_inference`` info of ``choose_rule``.
    """
    return {"task_inference": {"rules": list(rules), "rule_in_use": [i["task_inference"]["rule"] for i in infos],
                               "val_task_id": [i["task_inference"].get("val_task_id") for i in infos],
                               "bytes_per_task": bytes_per_task(inference, rules)}}
