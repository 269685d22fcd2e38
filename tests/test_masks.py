"""Owner maps: initial ownership, selection policies, shares that add up, derived masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import diagnostics, masks, models


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


def _topk_select(owner, scores, count, task):
    """The selection before one program served every task (``lax.top_k`` with a per-task ``count``): the reference."""
    if count == 0:
        return owner
    flat_owner = owner.reshape(-1)
    flat_scores = jnp.where(flat_owner == masks.FREE, scores.reshape(-1).astype(jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(flat_scores, count)
    return flat_owner.at[idx].set(jnp.asarray(task, masks.OWNER_DTYPE)).reshape(owner.shape)


def _topk_assign(owner, kinds, task, task_count, policy, key=None, weights=None):
    """The per-leaf eager ``assign`` before the jitted one, on ``_topk_select``: the reference."""
    leaves, treedef = jax.tree.flatten(owner)
    kind_leaves = treedef.flatten_up_to(kinds)
    weight_leaves = treedef.flatten_up_to(weights) if weights is not None else [None] * len(leaves)
    keys = jax.random.split(key, len(leaves)) if key is not None else [None] * len(leaves)
    out = []
    for o, kind, w, k in zip(leaves, kind_leaves, weight_leaves, keys):
        if kind != masks.GATED:
            out.append(o)
            continue
        count = int(jnp.sum(o == masks.FREE)) // (task_count - task)
        scores = jax.random.uniform(k, o.shape) if policy == "random" else jnp.abs(w)
        out.append(_topk_select(o, scores, count, task))
    return jax.tree.unflatten(treedef, out)


def _tied_tree(seed):
    """Gated layers of several shapes (and an owned classifier) whose |w| ties a lot: halves, and many zeros."""
    rng = np.random.default_rng(seed)
    shapes = {"conv": (3, 3, 4, 8), "dense": (13, 11), "vec": (5,), "zeros": (40,)}
    weights = {k: {"kernel": jnp.asarray(np.round(rng.normal(size=s) * 2) / 2 * (rng.random(s) < 0.6), jnp.float32)}
               for k, s in shapes.items()}
    weights["zeros"]["kernel"] = jnp.zeros((40,))
    weights["head"] = {"kernel": jnp.ones((11, 6))}
    kinds = {k: {"kernel": masks.GATED} for k in shapes} | {"head": {"kernel": masks.CLASSIFIER}}
    return weights, kinds


@pytest.mark.parametrize("policy", ["random", "magnitude"])
@pytest.mark.parametrize("task_count", [2, 5])
def test_selection_is_bit_identical_to_per_count_top_k(policy, task_count):
    weights, kinds = _tied_tree(task_count)
    assert int(jnp.sum(weights["dense"]["kernel"] == 0)) > 40  # ties among the free weights
    owner = ref = masks.init_owners(weights, kinds, (2, 2, 2) if task_count == 2 else (2, 1, 1, 1, 1))
    for t in range(task_count):
        key = jax.random.fold_in(jax.random.key(7), t)
        w = jax.tree.map(lambda x: x * (t + 1), weights) if policy == "magnitude" else None  # ranks by |w|, ties stay
        owner = masks.assign(owner, kinds, t, task_count, policy=policy, key=key, weights=w)
        ref = _topk_assign(ref, kinds, t, task_count, policy, key=key, weights=w)
        for got, want in zip(jax.tree.leaves(owner), jax.tree.leaves(ref)):
            assert got.dtype == want.dtype == masks.OWNER_DTYPE
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert masks.capacity_left(owner, kinds) == 0.0


@pytest.mark.parametrize("policy", ["random", "magnitude"])
def test_later_tasks_compile_nothing(policy):
    """Task 0 compiles the selection (and learn_task's other owner-map helpers); tasks 1..4 reuse every program,
    for the random share (MIND) and the largest-magnitude share (MIND's self-distillation, PackNet)."""
    weights, kinds = _tied_tree(0)
    owner = masks.init_owners(weights, kinds, (2, 1, 1, 1, 1))

    def task(owner, t):
        key = jax.random.fold_in(jax.random.key(1), t)
        owner = masks.assign(owner, kinds, t, 5, policy=policy, key=key,
                             weights=weights if policy == "magnitude" else None)
        params = masks.reinit_assigned(weights, owner, kinds, t, "zero")
        jax.block_until_ready(params)
        masks.capacity_left(owner, kinds), masks.free_fraction(owner, kinds)
        return owner

    owner = task(owner, 0)
    before = diagnostics.backend_compiles()
    for t in range(1, 5):
        owner = task(owner, t)
    after = diagnostics.backend_compiles()
    assert after == before, f"{after - before} compilation(s) after task 0"
    assert masks.capacity_left(owner, kinds) == 0.0


def test_task_outside_the_task_count_is_refused():
    owner = {"k": jnp.full((3,), -1, jnp.int16)}
    with pytest.raises(ValueError, match="outside 0..1"):
        masks.assign(owner, {"k": masks.GATED}, 2, 2, key=jax.random.key(0))
