"""Gated networks: parameter counts, per-task batch norm, and sub-network isolation across tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import masks, models, training


def test_parameter_counts_match_the_design():
    """ResNet-32 at 100 classes ~0.47M, ResNet-18 11.17M (CIFAR stem) / 11.69M (ImageNet, 1000 classes)."""
    counts = {}
    for name, model, shape in [
        ("resnet32/100", models.build("resnet32", 100), (32, 32, 3)),
        ("resnet18/10 cifar", models.build("resnet18", 10), (32, 32, 3)),
        ("resnet18/1000 imagenet", models.build("resnet18", 1000, stem="imagenet"), (64, 64, 3)),
        ("mlp/10", models.build("mlp", 10), (28, 28, 1)),
    ]:
        params = jax.eval_shape(lambda: models.init(model, jax.random.key(0), shape)[0])
        counts[name] = models.param_count(params)
    print("parameter counts:", counts)
    assert counts["resnet32/100"] == 470_004
    assert counts["resnet18/10 cifar"] == 11_173_962
    assert counts["resnet18/1000 imagenet"] == 11_689_512  # torchvision's resnet18
    assert counts["mlp/10"] == 478_410 + 800  # two 400-wide layers + BN scale/bias


def test_task_batch_norm_rows_are_selected_and_only_the_trained_row_moves():
    model = models.build("mlp", 6, num_tasks=3, hidden=(8,))
    params, stats = models.init(model, jax.random.key(0), (4, 4, 1))
    x = jax.random.normal(jax.random.key(1), (16, 4, 4, 1)) * 3 + 1
    _, new = model.apply({"params": params, "batch_stats": stats}, x, 1, train=True, mutable=["batch_stats"])
    moved = np.any(np.asarray(new["batch_stats"]["bn0"]["mean"]) != np.asarray(stats["bn0"]["mean"]), axis=1)
    np.testing.assert_array_equal(moved, [False, True, False])
    # a traced task id selects the row inside vmap
    outs = jax.vmap(lambda t: model.apply({"params": params, "batch_stats": new["batch_stats"]}, x, t))(jnp.arange(3))
    assert not np.allclose(outs[0], outs[1]) and np.allclose(outs[0], outs[2])


def _isolation(arch, input_shape, hidden=None):
    T, k = 2, 3
    kw = {"hidden": hidden} if hidden else {}
    model = models.build(arch, T * k, num_tasks=T, **kw)
    params, stats = models.init(model, jax.random.key(0), input_shape)
    kinds = models.leaf_kinds(params)
    owner = masks.init_owners(params, kinds, (k,) * T)
    spec = training.StepSpec(model.apply, block_size=k, mean=(0.5,) * input_shape[-1], std=(0.25,) * input_shape[-1])
    tx = training.make_optimizer("sgd", 0.05, weight_decay=1e-3)  # momentum + decay: the leaky case
    step = training.make_train_step(spec, tx)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, *input_shape), dtype=np.uint8)
    y = rng.integers(0, k, (8,)).astype(np.int32)

    def train(params, stats, owner, t, n):
        carry = (params, stats, tx.init(params))
        for i in range(n):
            carry, _ = step(carry, x, y, jax.random.key(i), jnp.int32(t),
                            masks.forward_mask(owner, t), masks.trainable_mask(owner, t), None)
        return carry[0], carry[1]

    owner = masks.assign(owner, kinds, 0, T, key=jax.random.key(10))
    params, stats = train(params, stats, owner, 0, 3)
    evaluate = jax.jit(lambda p, s, o: model.apply({"params": masks.gate(p, masks.forward_mask(o, 0)),
                                                    "batch_stats": s}, training.batching.to_float(
        x, jnp.asarray(spec.mean), jnp.asarray(spec.std)), 0))
    before = np.asarray(evaluate(params, stats, owner))
    p0, s0 = jax.tree.map(np.array, params), jax.tree.map(np.array, stats)  # the step donates its inputs
    owner = masks.assign(owner, kinds, 1, T, key=jax.random.key(11))
    params = masks.reinit_assigned(params, owner, kinds, 1, "keep")
    params, stats = train(params, stats, owner, 1, 3)
    after = np.asarray(evaluate(params, stats, owner))
    np.testing.assert_array_equal(after.view(np.uint32), before.view(np.uint32))
    own0 = masks.forward_mask(owner, 0)
    for a, b, m in zip(jax.tree.leaves(p0), jax.tree.leaves(params), jax.tree.leaves(own0)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32)[np.asarray(m)],
                                      np.asarray(b).view(np.uint32)[np.asarray(m)])
    for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(stats)):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
        assert not np.array_equal(np.asarray(a)[1], np.asarray(b)[1])  # task 1 really trained
    # and task 1 changed its own weights
    own1 = masks.trainable_mask(owner, 1)
    changed = [np.any(np.asarray(a)[np.asarray(m)] != np.asarray(b)[np.asarray(m)])
               for a, b, m in zip(jax.tree.leaves(p0), jax.tree.leaves(params), jax.tree.leaves(own1)) if np.any(m)]
    assert all(changed)


def test_mlp_subnetwork_unchanged_when_next_task_trains():
    _isolation("mlp", (8, 8, 1), hidden=(32, 16))


def test_resnet32_subnetwork_unchanged_when_next_task_trains():
    _isolation("resnet32", (32, 32, 3))
