"""Owner maps: initial ownership, selection policies, shares that add up, derived masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import masks, models


@pytest.fixture(scope="module")
def mlp():
    model = models.build("mlp", 4 * 3, num_tasks=4, hidden=(30, 20))
    params, _ = models.init(model, jax.random.key(0), (5, 5, 1))
    return params, models.leaf_kinds(params)


def test_leaf_kinds_and_initial_owners(mlp):
    params, kinds = mlp
    assert kinds["dense0"]["kernel"] == masks.GATED
    assert kinds["classifier"]["kernel"] == masks.CLASSIFIER and kinds["classifier"]["bias"] == masks.CLASSIFIER
    assert kinds["bn0"]["scale"] == masks.PER_TASK
    owner = masks.init_owners(params, kinds, (3, 3, 3, 3))
    assert owner["dense0"]["kernel"].dtype == jnp.int16
    assert np.all(np.asarray(owner["dense0"]["kernel"]) == masks.FREE)
    np.testing.assert_array_equal(np.asarray(owner["classifier"]["bias"]), np.repeat(np.arange(4), 3))
    np.testing.assert_array_equal(np.asarray(owner["bn1"]["bias"])[:, 0], np.arange(4))
    with pytest.raises(ValueError, match="class blocks"):
        masks.init_owners(params, kinds, (3, 3, 3))


@pytest.mark.parametrize("task_count", [3, 4, 7])
def test_shares_add_up_to_the_whole_layer(task_count):
    params = {"a": {"kernel": jnp.ones((13, 11))}, "b": {"kernel": jnp.ones((5,))}}
    kinds = {"a": {"kernel": masks.GATED}, "b": {"kernel": masks.GATED}}
    owner = masks.init_owners(params, kinds, ())
    key = jax.random.key(0)
    sizes = []
    for t in range(task_count):
        owner = masks.assign(owner, kinds, t, task_count, key=jax.random.fold_in(key, t))
        sizes.append(int(jnp.sum(owner["a"]["kernel"] == t)))
    assert masks.capacity_left(owner, kinds) == 0.0
    assert sum(sizes) == 143 and max(sizes) - min(sizes) <= 1
    assert set(np.unique(np.asarray(owner["b"]["kernel"]))) <= set(range(task_count))


def test_masks_follow_ownership():
    owner = {"w": jnp.array([-1, 0, 1, 2, 0], jnp.int16)}
    np.testing.assert_array_equal(masks.forward_mask(owner, 1)["w"], [False, True, True, False, True])
    np.testing.assert_array_equal(masks.trainable_mask(owner, 0)["w"], [False, True, False, False, True])
    np.testing.assert_array_equal(masks.free_mask(owner)["w"], [True, False, False, False, False])
    fwd = jax.jit(jax.vmap(lambda t: masks.forward_mask(owner, t)["w"]))(jnp.arange(3))  # traced task ids
    assert fwd.shape == (3, 5) and bool(fwd[2, 3]) and not bool(fwd[1, 3])


def test_random_policy_reproducible_and_only_free():
    params = {"k": {"kernel": jnp.ones((40, 40))}}
    kinds = {"k": {"kernel": masks.GATED}}
    owner = masks.init_owners(params, kinds, ())
    o1 = masks.assign(owner, kinds, 0, 4, key=jax.random.key(3))
    o1b = masks.assign(owner, kinds, 0, 4, key=jax.random.key(3))
    o2 = masks.assign(o1, kinds, 1, 4, key=jax.random.key(4))
    np.testing.assert_array_equal(o1["k"]["kernel"], o1b["k"]["kernel"])
    assert int(jnp.sum(o1["k"]["kernel"] == 0)) == 400
    np.testing.assert_array_equal(o2["k"]["kernel"] == 0, o1["k"]["kernel"] == 0)  # task 0 untouched
    assert int(jnp.sum(o2["k"]["kernel"] == 1)) == 400


def test_magnitude_policy_keeps_largest_free_weights():
    w = jnp.array([0.1, -5.0, 3.0, 0.2, -0.3, 4.0])
    owner = {"k": {"kernel": jnp.array([-1, -1, 0, -1, -1, -1], jnp.int16)}}
    kinds = {"k": {"kernel": masks.GATED}}
    out = masks.assign(owner, kinds, 1, 3, policy="magnitude", weights={"k": {"kernel": w}})
    # 5 free, 2 tasks left -> 2 weights: the largest |w| among the free ones (-5 and 4, not the owned 3)
    np.testing.assert_array_equal(out["k"]["kernel"], [-1, 1, 0, -1, -1, 1])


def test_bad_policy_and_missing_inputs():
    owner = {"k": jnp.full((3,), -1, jnp.int16)}
    kinds = {"k": masks.GATED}
    with pytest.raises(ValueError, match="unknown selection policy"):
        masks.assign(owner, kinds, 0, 2, policy="best", key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        masks.assign(owner, kinds, 0, 2)
    with pytest.raises(ValueError, match="trained weights"):
        masks.assign(owner, kinds, 0, 2, policy="magnitude")


def test_supports_a_thousand_tasks():
    params = {"k": {"kernel": jnp.ones((1000,))}, "c": {"kernel": jnp.ones((2, 1000))}}
    kinds = {"k": {"kernel": masks.GATED}, "c": {"kernel": masks.CLASSIFIER}}
    owner = masks.init_owners(params, kinds, (1,) * 1000)
    owner = masks.assign(owner, kinds, 0, 1000, key=jax.random.key(0))
    assert int(jnp.sum(owner["k"]["kernel"] == 0)) == 1 and int(owner["c"]["kernel"][1, 999]) == 999
    owner = masks.assign(owner, kinds, 999, 1000, key=jax.random.key(1))  # the last task takes the rest
    assert int(jnp.sum(owner["k"]["kernel"] == 999)) == 999 and bool(masks.forward_mask(owner, 999)["k"]["kernel"].all())


def test_gate_and_reinit():
    params = {"k": {"kernel": jnp.array([1.0, 2.0, 3.0])}}
    owner = {"k": {"kernel": jnp.array([0, 1, -1], jnp.int16)}}
    kinds = {"k": {"kernel": masks.GATED}}
    np.testing.assert_array_equal(masks.gate(params, masks.forward_mask(owner, 0))["k"]["kernel"], [1, 0, 0])
    np.testing.assert_array_equal(masks.reinit_assigned(params, owner, kinds, 1, "zero")["k"]["kernel"], [1, 0, 3])
    assert masks.reinit_assigned(params, owner, kinds, 1, "keep") is params
    assert masks.free_fraction(owner, kinds) == {"k/kernel": pytest.approx(1 / 3)}
