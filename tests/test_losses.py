"""Tests for modkd_jax.losses against hand-computed numpy float64 values."""

import doctest
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import losses

LOG2 = math.log(2.0)


def np_softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0), -1)


def np_js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = 0.5 * (p + q)
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def test_module_docstring_example_runs():
    assert doctest.testmod(losses).failed == 0


# ---------------------------------------------------------------- cross entropy
def test_cross_entropy_matches_numpy():
    logits = np.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    labels = np.array([0, 2])
    expected = -np.mean(np.log(np_softmax(logits))[np.arange(2), labels])
    out = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_losses_return_float32_for_bf16_inputs():
    z = jnp.ones((2, 3), jnp.bfloat16)
    assert losses.cross_entropy(z, jnp.array([0, 1])).dtype == jnp.float32
    assert losses.js_divergence(z, z).dtype == jnp.float32
    assert losses.kd_kl(z, z, 2.0).dtype == jnp.float32


# ---------------------------------------------------------------- block / mask
def test_block_logits_slices_under_jit_with_traced_offset():
    z = jnp.arange(12.0).reshape(2, 6)
    f = jax.jit(losses.block_logits, static_argnums=2)
    np.testing.assert_array_equal(f(z, jnp.int32(2), 2), [[2.0, 3.0], [8.0, 9.0]])
    np.testing.assert_array_equal(f(z, jnp.int32(4), 2), [[4.0, 5.0], [10.0, 11.0]])


def test_masked_logits_zero_probability_and_finite_grads():
    z = jnp.array([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 7.0]])
    valid = jnp.array([False, True, True, False])
    m = losses.masked_logits(z, valid)
    assert all_finite(m)
    p = jax.nn.softmax(m)
    np.testing.assert_array_equal(p[:, [0, 3]], 0.0)
    np.testing.assert_allclose(p[:, 1:3], np_softmax(np.asarray(z)[:, 1:3]), rtol=1e-6)

    labels = jnp.array([1, 2])
    g = jax.grad(lambda x: losses.cross_entropy(losses.masked_logits(x, valid), labels))(z)
    assert all_finite(g)
    np.testing.assert_array_equal(g[:, [0, 3]], 0.0)
    g_js = jax.grad(lambda x: losses.js_divergence(losses.masked_logits(x, valid), z))(z)
    assert all_finite(g_js)


def test_masked_logits_fully_masked_row_stays_finite():
    z = jnp.ones((1, 3))
    f = lambda x: losses.cross_entropy(losses.masked_logits(x, jnp.zeros(3, bool)), jnp.array([0]))
    assert all_finite(f(z)) and all_finite(jax.grad(f)(z))


# ---------------------------------------------------------------- KD KL
def test_kd_kl_equals_t2_times_numpy_kl():
    s = np.array([[1.0, 0.0, -1.0], [0.3, 2.0, -0.5]])
    t = np.array([[0.0, 2.0, 1.0], [1.5, -1.0, 0.2]])
    T = 3.0
    expected = T**2 * np.mean(np_kl(np_softmax(t, T), np_softmax(s, T)))
    out = losses.kd_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), T)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_kd_kl_zero_for_equal_logits_and_teacher_has_no_grad():
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
    np.testing.assert_allclose(losses.kd_kl(z, z, 2.0), 0.0, atol=1e-7)
    g_teacher = jax.grad(losses.kd_kl, argnums=1)(z + 1.0, z, 2.0)
    np.testing.assert_array_equal(g_teacher, 0.0)


def test_kd_kl_teacher_with_zero_probability_entries_is_finite():
    t = jnp.array([[0.0, -jnp.inf, 1.0]])
    s = jnp.array([[0.5, 0.2, -0.3]])
    val, g = jax.value_and_grad(losses.kd_kl)(s, t, 2.0)
    p_t = np_softmax(np.array([[0.0, -np.inf, 1.0]]), 2.0)
    np.testing.assert_allclose(val, 4.0 * np_kl(p_t, np_softmax(np.asarray(s), 2.0)).mean(), rtol=1e-5)
    assert all_finite(g)


# ---------------------------------------------------------------- JS
def test_js_disjoint_supports_is_log2():
    p = jnp.array([[0.0, -jnp.inf]])
    q = jnp.array([[-jnp.inf, 0.0]])
    np.testing.assert_allclose(losses.js_divergence(p, q), LOG2, rtol=1e-6)
    p_big = jnp.array([[0.0, -200.0]])
    q_big = jnp.array([[-200.0, 0.0]])
    np.testing.assert_allclose(losses.js_divergence(p_big, q_big), LOG2, rtol=1e-6)


def test_js_equal_distributions_is_zero():
    z = jnp.array([[0.1, -2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(losses.js_divergence(z, z, temperature=2.0), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.js_divergence(z, z + 5.0), 0.0, atol=1e-7)  # shift-invariant


def test_js_hand_worked_three_class_example():
    p_logits = np.array([[1.0, 0.0, -1.0]])
    q_logits = np.array([[-0.5, 2.0, 0.5]])
    T = 1.5
    p, q = np_softmax(p_logits, T), np_softmax(q_logits, T)
    m = 0.5 * (p + q)
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    out = losses.js_divergence(jnp.asarray(p_logits, jnp.float32), jnp.asarray(q_logits, jnp.float32), T)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_js_symmetric_and_bounded_on_random_logits():
    kp, kq = jax.random.split(jax.random.PRNGKey(42))
    p = 4.0 * jax.random.normal(kp, (256, 7))
    q = 4.0 * jax.random.normal(kq, (256, 7))
    per_example = jax.vmap(lambda a, b: losses.js_divergence(a[None], b[None]))(p, q)
    per_example_swapped = jax.vmap(lambda a, b: losses.js_divergence(a[None], b[None]))(q, p)
    chex.assert_shape(per_example, (256,))
    np.testing.assert_allclose(per_example, per_example_swapped, atol=1e-6)
    assert bool(jnp.all(per_example >= -1e-6)) and bool(jnp.all(per_example <= LOG2 + 1e-6))
    expected = np_js(np_softmax(np.asarray(p)), np_softmax(np.asarray(q)))
    np.testing.assert_allclose(per_example, expected, atol=1e-5)
    np.testing.assert_allclose(losses.js_divergence(p, q), expected.mean(), atol=1e-6)


@pytest.mark.parametrize(
    "p, q",
    [
        ([[0.0, -jnp.inf, -jnp.inf]], [[-jnp.inf, 0.0, -jnp.inf]]),  # disjoint, shared zero entry
        ([[0.0, -jnp.inf, 1.0]], [[0.0, -jnp.inf, 1.0]]),  # equal with a zero entry
        ([[0.0, -1e30, 3.0]], [[-1e30, 0.0, -1e30]]),  # very negative finite logits
        ([[0.0, -200.0]], [[-200.0, 0.0]]),
    ],
)
def test_js_grads_finite_for_degenerate_inputs(p, q):
    p, q = jnp.array(p), jnp.array(q)
    val, grads = jax.value_and_grad(losses.js_divergence, argnums=(0, 1))(p, q, 2.0)
    assert all_finite(val) and all_finite(grads)


def test_js_is_jittable_with_traced_temperature():
    z = jnp.array([[1.0, 0.0, -1.0]])
    f = jax.jit(losses.js_divergence)
    np.testing.assert_allclose(f(z, -z, 2.0), losses.js_divergence(z, -z, 2.0), rtol=1e-6)


# ---------------------------------------------------------------- MSE
def test_mse_soft_targets_by_hand():
    # softmax([0, 0]) = [.5, .5]; softmax([log 3, 0]) = [.75, .25] -> errors .25^2 each.
    s = jnp.array([[0.0, 0.0]])
    t = jnp.array([[math.log(3.0), 0.0]])
    np.testing.assert_allclose(losses.mse_soft_targets(s, t), 0.0625, rtol=1e-6)
    # At T=2 the teacher becomes softmax([log3/2, 0]) = [sqrt3, 1] / (sqrt3 + 1).
    pt = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    np.testing.assert_allclose(losses.mse_soft_targets(s, t, 2.0), (pt - 0.5) ** 2, rtol=1e-5)
    np.testing.assert_array_equal(jax.grad(losses.mse_soft_targets, argnums=1)(s, t), 0.0)


# ---------------------------------------------------------------- MIND
def _hand_symkl(p_logits, q_logits, T=1.0):
    """0.5 [KL(p||q) + KL(q||p)] per example of softmax(./T), in numpy float64."""
    def softmax(z):
        e = np.exp(z / T - np.max(z / T, axis=-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(np.asarray(p_logits, np.float64)), softmax(np.asarray(q_logits, np.float64))
    return 0.5 * (np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1))


def test_symmetric_kl_equals_the_hand_computed_formula():
    p = np.array([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]], np.float32)
    q = np.array([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0]], np.float32)
    np.testing.assert_allclose(losses.symmetric_kl(p, q), _hand_symkl(p, q).mean(), rtol=1e-6)
    # two classes, by hand: p = (e/(1+e), 1/(1+e)), q = (1/2, 1/2)
    a = math.e / (1 + math.e)
    by_hand = 0.5 * ((a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
                     + (0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / (1 - a))))
    np.testing.assert_allclose(losses.symmetric_kl(jnp.array([[1.0, 0.0]]), jnp.zeros((1, 2))), by_hand, rtol=1e-6)


def test_symmetric_kl_is_symmetric_zero_on_equal_inputs_and_scaled_by_t_squared():
    key = jax.random.key(3)
    p, q = jax.random.normal(key, (2, 8, 5)) * 3.0
    np.testing.assert_allclose(losses.symmetric_kl(p, q), losses.symmetric_kl(q, p), rtol=1e-6)
    np.testing.assert_allclose(losses.symmetric_kl(p, p), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.symmetric_kl(p, p + 4.0), 0.0, atol=1e-6)  # shift-invariant
    for T in (0.5, 2.0, 6.5):
        np.testing.assert_allclose(losses.symmetric_kl(p, q, T), T**2 * _hand_symkl(p, q, T).mean(), rtol=1e-5)
    # it is not the JS divergence: JS <= J/4 for Jeffreys' J = 2 symmetric KL (Lin 1991), and JS <= log 2
    assert float(losses.symmetric_kl(p, q)) > 2 * float(losses.js_divergence(p, q))
    assert float(losses.symmetric_kl(jnp.array([[30.0, 0.0]]), jnp.array([[0.0, 30.0]]))) > 10 * LOG2


def test_distillation_dispatches_scales_by_t_squared_and_freezes_the_teacher():
    s = jnp.array([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    t = jnp.array([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0]])
    T = 2.0
    np.testing.assert_allclose(losses.distillation("symkl", s, t, T), T**2 * _hand_symkl(t, s, T).mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.distillation("js", s, t, T), T**2 * losses.js_divergence(t, s, T), rtol=1e-6)
    np.testing.assert_allclose(losses.distillation("kd", s, t, T), losses.kd_kl(s, t, T), rtol=1e-6)
    for kind in losses.DISTILL_LOSSES:
        np.testing.assert_array_equal(jax.grad(lambda tt: losses.distillation(kind, s, tt, T))(t), 0.0)
    with pytest.raises(ValueError, match="unknown distillation loss"):
        losses.distillation("l2", s, t)


def test_mind_distillation_loss_is_ce_plus_beta_symmetric_kl():
    s = jnp.array([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]])
    t = jnp.array([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0]])
    labels = jnp.array([0, 2])
    beta = 5.0
    loss, parts = losses.mind_distillation_loss(s, t, labels, beta)  # the paper: T = 1, symmetric KL
    np.testing.assert_allclose(parts["ce"], losses.cross_entropy(s, labels), rtol=1e-6)
    np.testing.assert_allclose(parts["distill"], _hand_symkl(t, s).mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, parts["ce"] + beta * parts["distill"], rtol=1e-6)
    g_teacher = jax.grad(lambda tt: losses.mind_distillation_loss(s, tt, labels, beta)[0])(t)
    np.testing.assert_array_equal(g_teacher, 0.0)
    jitted = jax.jit(losses.mind_distillation_loss)(s, t, labels, beta)
    np.testing.assert_allclose(jitted[0], loss, rtol=1e-6)
    _, js_parts = losses.mind_distillation_loss(s, t, labels, beta, 2.0, kind="js")
    np.testing.assert_allclose(js_parts["distill"], 4.0 * losses.js_divergence(t, s, 2.0), rtol=1e-6)
