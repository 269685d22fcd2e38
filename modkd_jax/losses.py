"""Classification and distillation losses for continual learning (all jit-able).

Every loss takes logits of shape ``[..., num_classes]``, reduces with a mean
over the batch (leading) axes and returns a float32 scalar. Inputs are upcast to
float32 first, so bfloat16 logits are safe. Divergences are computed from
``log_softmax`` in log space with no epsilons; entries of zero probability
contribute exactly 0 to the value and to the gradient (never NaN).

Example:
    >>> import jax.numpy as jnp
    >>> from modkd_jax import losses
    >>> p = jnp.array([[0.0, -jnp.inf]])  # all mass on class 0
    >>> q = jnp.array([[-jnp.inf, 0.0]])  # all mass on class 1
    >>> round(float(losses.js_divergence(p, q)), 6)  # disjoint supports: log 2
    0.693147
    >>> z = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    >>> losses.block_logits(z, 2, 2).tolist()  # classes 2..3 of a 2-class task
    [[0.0, -1.0]]
    >>> float(losses.kd_kl(z, z, temperature=2.0))  # identical teacher
    0.0
    >>> float(losses.symmetric_kl(z, z))  # MIND's L_SD of equal inputs
    0.0
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# Finite stand-in for -inf used by `masked_logits`; see that function.
MASK_VALUE = -1e9


def _f32(x: jax.typing.ArrayLike) -> Array:
    """Upcast to float32 so every loss computes and returns float32."""
    return jnp.asarray(x, jnp.float32)


def batch_mean(values: Array, weights: jax.typing.ArrayLike | None = None) -> Array:
    """Mean of per-example ``values``, or their ``weights``-weighted mean (a padded batch's ``valid`` mask).

    Args:
      values: per-example values ``[B, ...]``.
      weights: per-example weights ``[B]`` (or the values' leading axes), broadcast over the rest; None: plain mean.
    """
    if weights is None:
        return jnp.mean(values)
    w = jnp.asarray(weights, jnp.float32).reshape(weights.shape + (1,) * (values.ndim - weights.ndim))
    w = jnp.broadcast_to(w, values.shape)
    return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1.0)


def _log_probs(logits: jax.typing.ArrayLike, temperature: float | Array) -> Array:
    """Temperature-scaled log-softmax over the class axis (the only normaliser used)."""
    return jax.nn.log_softmax(_f32(logits) / temperature, axis=-1)


def _kl_log(log_p: Array, log_q: Array) -> Array:
    """Per-example KL(p || q) from log-probs, with 0*log0 := 0 in value and gradient.

    Zero-probability entries of p (log_p == -inf) are replaced by 0 *before* the
    optax formula so no NaN is ever formed (a plain `where` on the output would
    still leak NaN through the backward pass).
    """
    support = log_p > -jnp.inf
    log_p = jnp.where(support, log_p, 0.0)
    log_q = jnp.where(support, log_q, 0.0)
    return optax.losses.kl_divergence_with_log_targets(log_q, log_p, axis=-1, where=support)


def cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, weights=None) -> Array:
    """Batch-mean softmax cross-entropy with integer labels (the plain task loss); ``weights``: see ``batch_mean``.

    Args:
      logits: ``[..., num_classes]``.
      labels: integer class indices, the logits' leading shape.
      weights: per-example weights (a padded batch's ``valid`` mask); None: plain mean.
    """
    return batch_mean(optax.softmax_cross_entropy_with_integer_labels(_f32(logits), labels), weights)


def block_logits(logits: jax.typing.ArrayLike, offset: int | Array, size: int) -> Array:
    """Logits of one task's class block [offset, offset+size), so training never sees other tasks.

    Args:
      logits: ``[..., num_classes]``.
      offset: the block's first class; may be traced. As with ``jax.lax.dynamic_slice``, an offset that would
        run past the end is clamped.
      size: the block's classes (static).
    """
    return jax.lax.dynamic_slice_in_dim(jnp.asarray(logits), offset, size, axis=-1)


def masked_logits(logits: jax.typing.ArrayLike, valid: jax.typing.ArrayLike) -> Array:
    """Set logits where ``valid`` is False to MASK_VALUE (-1e9) so those classes get probability 0.

    A finite value is used instead of -inf so that softmax, CE and KL stay
    finite with finite gradients even if a whole row is masked (it becomes
    uniform instead of NaN); exp(-1e9 - max) underflows to exactly 0 in float32.

    Args:
      logits: ``[..., num_classes]``.
      valid: boolean, broadcast against ``logits`` (e.g. shape ``[num_classes]``); False masks a class.
    """
    logits = jnp.asarray(logits)
    return jnp.where(valid, logits, jnp.asarray(MASK_VALUE, logits.dtype))


def kd_kl(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: float | Array,
    weights=None,
) -> Array:
    """Hinton distillation: T^2 * KL(p_teacher || p_student) at temperature T, teacher frozen.

    Args:
      student_logits: ``[..., num_classes]``.
      teacher_logits: the same shape (a stop_gradient is applied here).
      temperature: T.
      weights: per-example weights (see ``batch_mean``); None: plain batch mean.
    """
    log_pt = _log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
    log_ps = _log_probs(student_logits, temperature)
    return batch_mean(_kl_log(log_pt, log_ps), weights) * temperature**2


def js_divergence(
    p_logits: jax.typing.ArrayLike,
    q_logits: jax.typing.ArrayLike,
    temperature: float | Array = 1.0,
    weights=None,
) -> Array:
    """Batch-mean Jensen-Shannon divergence of softmax(p/T) and softmax(q/T), in [0, log 2].

    JS = 0.5 KL(p||m) + 0.5 KL(q||m) with log m = logaddexp(log p, log q) - log 2.
    Symmetric and bounded, unlike KL.

    Args:
      p_logits: ``[..., num_classes]``.
      q_logits: the same shape. No stop_gradient is applied here: wrap the teacher's logits in
        ``jax.lax.stop_gradient`` at the call site.
      temperature: T.
      weights: per-example weights (see ``batch_mean``); None: plain batch mean.
    """
    log_p = _log_probs(p_logits, temperature)
    log_q = _log_probs(q_logits, temperature)
    # Where both are -inf, m is 0 and the entry is dropped by _kl_log anyway;
    # feeding 0s there keeps logaddexp's backward pass free of (-inf) - (-inf).
    both_zero = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    log_m = jnp.logaddexp(jnp.where(both_zero, 0.0, log_p), jnp.where(both_zero, 0.0, log_q))
    log_m = log_m - math.log(2.0)
    return batch_mean(0.5 * _kl_log(log_p, log_m) + 0.5 * _kl_log(log_q, log_m), weights)


def mse_soft_targets(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: float | Array = 1.0,
) -> Array:
    """Mean (over batch and classes) squared error between softened probabilities, teacher frozen.

    Args:
      student_logits: ``[..., num_classes]``.
      teacher_logits: the same shape (a stop_gradient is applied here).
      temperature: the softening temperature T (no T^2 factor).
    """
    p_t = jnp.exp(_log_probs(jax.lax.stop_gradient(teacher_logits), temperature))
    p_s = jnp.exp(_log_probs(student_logits, temperature))
    return jnp.mean((p_s - p_t) ** 2)


def symmetric_kl(
    p_logits: jax.typing.ArrayLike,
    q_logits: jax.typing.ArrayLike,
    temperature: float | Array = 1.0,
    weights=None,
) -> Array:
    """MIND's L_SD: T^2 * 1/2 [KL(p||q) + KL(q||p)] of softmax(p/T) and softmax(q/T), batch mean.

    The paper calls it "Jensen-Shannon", but its formula (and the reference code)
    is this symmetric KL; ``js_divergence`` is the true JS. The T^2 factor keeps
    the gradient's scale independent of T (as in Hinton's KD); at T = 1 it is 1.

    Args:
      p_logits: ``[..., num_classes]``.
      q_logits: the same shape. No stop_gradient here: wrap the teacher's logits at the call site.
      temperature: T.
      weights: per-example weights (see ``batch_mean``); None: plain batch mean.
    """
    log_p = _log_probs(p_logits, temperature)
    log_q = _log_probs(q_logits, temperature)
    return batch_mean(0.5 * (_kl_log(log_p, log_q) + _kl_log(log_q, log_p)), weights) * temperature**2


DISTILL_LOSSES = ("symkl", "js", "kd")


def distillation(
    kind: str,
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    temperature: float | Array = 1.0,
    weights=None,
) -> Array:
    """The distillation term ``kind`` against a frozen teacher at temperature T, scaled by T^2 (``weights``: a
    padded batch's ``valid`` mask, see ``batch_mean``).

    Every kind carries the T^2 factor, so T = 1 gives the plain divergence.

    Args:
      kind: ``symkl``: MIND's L_SD (``symmetric_kl``, the paper's default); ``js``: the true Jensen-Shannon
        divergence (``js_divergence``); ``kd``: Hinton's KL(p_teacher || p_student) (``kd_kl``).
      student_logits: ``[..., num_classes]``.
      teacher_logits: the same shape (a stop_gradient is applied here).
      temperature: T.
      weights: per-example weights; None: plain batch mean.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if kind == "symkl":
        return symmetric_kl(teacher_logits, student_logits, temperature, weights)
    if kind == "js":
        return js_divergence(teacher_logits, student_logits, temperature, weights) * temperature**2
    if kind == "kd":
        return kd_kl(student_logits, teacher_logits, temperature, weights)
    raise ValueError(f"unknown distillation loss {kind!r}; expected one of {', '.join(DISTILL_LOSSES)}")


def mind_distillation_loss(
    student_logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    beta: float | Array,
    temperature: float | Array = 1.0,
    kind: str = "symkl",
) -> tuple[Array, dict[str, Array]]:
    """MIND objective CE(student, labels) + beta * L_SD(teacher, student) at T, teacher frozen; returns (loss, parts).

    Args:
      student_logits: ``[B, num_classes]``.
      teacher_logits: the same shape (frozen: a stop_gradient is applied).
      labels: integer classes ``[B]``.
      beta: the weight of L_SD.
      temperature: T of L_SD.
      kind: L_SD's divergence, the paper's symmetric KL by default (see ``distillation``).

    Returns:
      ``(loss, {"ce", "distill"})``.
    """
    ce = cross_entropy(student_logits, labels)
    sd = distillation(kind, student_logits, teacher_logits, temperature)
    return ce + beta * sd, {"ce": ce, "distill": sd}
