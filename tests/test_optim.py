"""gated(...) keeps masked parameters bit-identical under momentum, Adam and weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modkd_jax import optim


def _params(key):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (17, 9))
    w = w.at[0, :4].set(-0.0).at[1, :4].set(0.0)  # signed zeros: x + 0.0 would flip -0.0 to +0.0
    return {"w": w, "b": jax.random.normal(k2, (9,)), "s": jnp.float32(-0.0)}


def _mask(key, params):
    k1, k2 = jax.random.split(key)
    m = jax.random.bernoulli(k1, 0.5, params["w"].shape)
    m = m.at[0, :2].set(False).at[1, :2].set(False).at[0, 2:4].set(True)
    return {"w": m, "b": jax.random.bernoulli(k2, 0.5, (9,)), "s": False}


def _bits(x):
    return np.asarray(x).view(np.uint32)


def _train(tx, steps: int):
    """``steps`` jitted updates of ``tx`` with random gradients and the fixed mask; (params0, mask, params)."""
    params0 = _params(jax.random.key(0))
    mask = _mask(jax.random.key(1), params0)
    state = tx.init(params0)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, jnp.shape(p)), params)
        updates, state = tx.update(grads, state, params, mask=mask)
        return optax.apply_updates(params, updates), state

    params = params0
    for i in range(steps):
        params, state = step(params, state, jax.random.key(100 + i))
    return params0, mask, params


@pytest.mark.parametrize("inner", [
    optax.sgd(0.1, momentum=0.9),
    optax.adamw(1e-2, weight_decay=1e-1),
    optax.chain(optax.add_decayed_weights(1e-1), optax.sgd(0.1)),
], ids=["sgd_momentum", "adamw", "decay_then_sgd"])
def test_frozen_weights_bit_identical_after_50_steps(inner):
    params0, mask, params = _train(optim.gated(inner), 50)
    frozen = ~np.asarray(mask["w"])
    np.testing.assert_array_equal(_bits(params["w"])[frozen], _bits(params0["w"])[frozen])
    assert np.asarray(params["w"])[0, 0] == 0 and np.signbit(np.asarray(params["w"])[0, 0])
    np.testing.assert_array_equal(_bits(params["b"])[~np.asarray(mask["b"])],
                                  _bits(params0["b"])[~np.asarray(mask["b"])])
    assert _bits(params["s"]) == _bits(params0["s"])  # scalar False freezes the whole leaf
    assert np.all(np.asarray(params["w"])[np.asarray(mask["w"])] != np.asarray(params0["w"])[np.asarray(mask["w"])])


def test_ungated_optimizer_leaks_where_gated_does_not():
    """The trap this module exists for: zeroed gradients still move weights under decay."""
    params = {"w": jnp.array([1.0, 2.0])}
    mask = {"w": jnp.array([True, False])}
    grads = {"w": jnp.zeros(2)}
    inner = optax.adamw(1e-1, weight_decay=0.5)
    updates, _ = inner.update(grads, inner.init(params), params)
    leaked = optax.apply_updates(params, updates)
    assert _bits(leaked["w"])[1] != _bits(params["w"])[1]  # decay moved a zero-gradient weight
    tx = optim.gated(inner)
    updates, _ = tx.update(grads, tx.init(params), params, mask=mask)
    kept = optax.apply_updates(params, updates)
    assert _bits(kept["w"])[1] == _bits(params["w"])[1]


def test_mask_changes_at_run_time_without_recompiling():
    params = {"w": jnp.arange(4.0)}
    tx = optim.gated(optax.sgd(1.0))
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, mask):
        traces.append(1)
        updates, state = tx.update({"w": jnp.ones(4)}, state, params, mask=mask)
        return optax.apply_updates(params, updates), state

    p1, state = step(params, state, {"w": jnp.array([True, False, False, False])})
    p2, state = step(p1, state, {"w": jnp.array([False, True, False, False])})
    np.testing.assert_array_equal(p2["w"], [-1.0, 0.0, 2.0, 3.0])
    assert len(traces) == 1


def test_apply_gated_selects_old_bits():
    params = {"w": jnp.array([-0.0, 1.0])}
    out = optim.apply_gated(params, {"w": jnp.array([5.0, 5.0])}, {"w": jnp.array([False, True])})
    assert _bits(out["w"])[0] == _bits(params["w"])[0]
    assert float(out["w"][1]) == 6.0


def test_per_group_learning_rates_and_frozen_group():
    params = {"stem": {"kernel": jnp.array([-0.0, 1.0])}, "mid": {"kernel": jnp.ones(2)},
              "head": {"kernel": jnp.ones(2)}}
    labels = {"stem": {"kernel": "frozen"}, "mid": {"kernel": "shared"}, "head": {"kernel": "task"}}
    tx = optim.per_group_lr({"frozen": None, "shared": 1e-3, "task": 1e-2}, labels)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(_bits(new["stem"]["kernel"]), _bits(params["stem"]["kernel"]))
    np.testing.assert_allclose(new["mid"]["kernel"], 1 - 1e-3)
    np.testing.assert_allclose(new["head"]["kernel"], 1 - 1e-2)


def test_top_level_exports():
    import modkd_jax
    assert modkd_jax.gated is optim.gated and modkd_jax.per_group is optim.per_group


# One conformance test over many optax optimizers (as optax's contrib/_common_test.py does): gated(...) keeps the
# frozen entries bit-identical and trains the others, alone, wrapped in inject_hyperparams and inside optax.chain.
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "adamax": lambda: optax.adamax(1e-2),
    "adagrad": lambda: optax.adagrad(1e-1),
    "rmsprop": lambda: optax.rmsprop(1e-2, momentum=0.9),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "lamb": lambda: optax.lamb(1e-2),
    "radam": lambda: optax.radam(1e-2),
    "yogi": lambda: optax.yogi(1e-2),
    "adabelief": lambda: optax.adabelief(1e-2),
    "novograd": lambda: optax.novograd(1e-2),
    "injected_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1),
}
WRAPPINGS = {
    "alone": lambda inner: optim.gated(inner),
    "in_chain": lambda inner: optax.chain(optax.clip_by_global_norm(1.0), optim.gated(inner)),
    "around_chain": lambda inner: optim.gated(optax.chain(optax.add_decayed_weights(0.1), inner)),
}


@pytest.mark.parametrize("wrap", WRAPPINGS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_conformance_every_optimizer_keeps_frozen_bits(name, wrap):
    tx = WRAPPINGS[wrap](OPTIMIZERS[name]())
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params0, mask, params = _train(tx, 5)
    for leaf in ("w", "b"):
        frozen = ~np.asarray(mask[leaf])
        np.testing.assert_array_equal(_bits(params[leaf])[frozen], _bits(params0[leaf])[frozen])
        assert np.any(np.asarray(params[leaf])[~frozen] != np.asarray(params0[leaf])[~frozen])
    assert _bits(params["s"]) == _bits(params0["s"])


def test_gated_needs_its_mask_and_passes_other_extra_args_through():
    params = {"w": jnp.ones(3)}
    tx = optim.gated(optax.sgd(1.0))
    with pytest.raises(TypeError, match="mask"):
        tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    seen = {}

    def spy_update(updates, state, params=None, *, value=None, **extra):
        seen["value"] = value
        return updates, state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), spy_update)
    tx = optim.gated(spy)
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params, mask={"w": jnp.array([1, 0, 1], bool)},
                           value=7)
    assert seen["value"] == 7
    np.testing.assert_array_equal(np.signbit(np.asarray(updates["w"])), [False, True, False])
