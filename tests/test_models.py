"""Gated networks: parameter counts, per-task batch norm, and sub-network isolation across tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import masks, models, training
from modkd_jax.methods import mind


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
    mean, std = (0.5,) * input_shape[-1], (0.25,) * input_shape[-1]
    tx = training.make_optimizer("sgd", 0.05, weight_decay=1e-3)  # momentum + decay: the leaky case
    step = training.make_step(mind.make_loss(model.apply, k), tx, training.augmenting(mean, std))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, *input_shape), dtype=np.uint8)
    y = rng.integers(0, k, (8,)).astype(np.int32)

    def train(params, stats, owner, t, n):
        carry = (params, stats, tx.init(params))
        for i in range(n):
            carry, _ = step(carry, training.Batch(x, y), jax.random.key(i),
                            mind.Context(jnp.int32(t), masks.forward_mask(owner, t), masks.trainable_mask(owner, t)))
        return carry[0], carry[1]

    owner = masks.assign(owner, kinds, 0, T, key=jax.random.key(10))
    params, stats = train(params, stats, owner, 0, 3)
    evaluate = jax.jit(lambda p, s, o: model.apply({"params": masks.gate(p, masks.forward_mask(o, 0)),
                                                    "batch_stats": s}, training.batching.to_float(
        x, jnp.asarray(mean), jnp.asarray(std)), 0))
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


# --- convolution lowerings and materialize (issue 5: same numerics whichever lowering runs) ---

from modkd_jax.models import layers, resnet  # noqa: E402

CONV_CASES = [  # (kernel, stride, pad, input HxW, cin, cout): ResNet-32/18 convs, stem and projections
    (3, 1, 1, 8, 16, 16), (3, 2, 1, 9, 16, 32), (1, 2, 0, 8, 16, 32), (7, 2, 3, 12, 3, 8), (1, 1, 0, 5, 4, 4)]


@pytest.mark.parametrize("k,stride,pad,hw,cin,cout", CONV_CASES)
def test_conv_lowerings_agree(k, stride, pad, hw, cin, cout):
    """'patches' (im2col + matmul) matches XLA's conv to float32 rounding; 'bf16' to bfloat16 rounding."""
    x = jax.random.normal(jax.random.key(0), (2, hw, hw, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / np.sqrt(k * k * cin)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    xla = layers.conv2d(x, w, stride, pad, "xla")
    patches = layers.conv2d(x, w, stride, pad, "patches")
    bf16 = layers.conv2d(x, w, stride, pad, "bf16")
    assert xla.shape == patches.shape == bf16.shape == ref.shape
    assert xla.dtype == patches.dtype == bf16.dtype == jnp.float32
    np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(patches, ref, rtol=1e-5, atol=1e-5)
    # bf16 operands carry 8 significant bits: |error| ~ 2^-8 of the operands' scale, accumulated in float32
    np.testing.assert_allclose(bf16, ref, rtol=0, atol=3e-2 * float(jnp.max(jnp.abs(ref))))
    assert not np.array_equal(bf16, xla)  # really computed in bfloat16


def test_conv_lowerings_agree_on_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8)) / 6.0

    def grads(impl):
        return jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.conv2d(x, w, 2, 1, impl))), argnums=(0, 1))(x, w)

    for a, b in zip(grads("xla"), grads("patches")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads("xla"), grads("bf16")):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-2 * float(jnp.max(jnp.abs(a))))


def test_unknown_conv_lowering_is_refused():
    with pytest.raises(ValueError, match="unknown conv impl 'winograd'"):
        layers.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="winograd")
    with pytest.raises(ValueError, match="unknown conv impl"):
        resnet.resnet32(10, conv_impl="winograd")


def test_resnet32_lowerings_share_parameters_and_agree():
    """Every lowering has the same parameter tree (checkpoints interchange) and the same outputs within tolerance."""
    x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
    ref_model = resnet.resnet32(10, 2, conv_impl="xla")
    params, stats = models.init(ref_model, jax.random.key(0), (32, 32, 3))
    variables = {"params": params, "batch_stats": stats}
    ref = ref_model.apply(variables, x, 1, train=False)
    for impl, atol in (("patches", 1e-4), ("bf16", 5e-2)):
        model = resnet.resnet32(10, 2, conv_impl=impl)
        p2, _ = models.init(model, jax.random.key(0), (32, 32, 3))
        assert jax.tree.structure(p2) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)  # same init, same layout
        out = model.apply(variables, x, 1, train=False)
        np.testing.assert_allclose(out, ref, rtol=0, atol=atol * max(1.0, float(jnp.max(jnp.abs(ref)))))


def test_materialize_is_the_identity_bit_for_bit():
    """``x / sign(|x| + 1)`` returns every float32 and bfloat16 bit pattern unchanged (NaNs stay NaN).

    Subnormals are the exception XLA:CPU makes for every arithmetic op (flush to
    zero): they come back as a zero of the same sign, like ``x * 1`` does.
    """
    bits = np.random.default_rng(0).integers(0, 2 ** 32, 100_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38,
                        1.0, -1.0], np.float32).view(np.uint32)
    x = np.concatenate([bits, special]).view(np.float32)
    out = np.asarray(jax.jit(layers.materialize)(x))
    times_one = np.asarray(jax.jit(lambda v, one: v * one)(x, np.float32(1.0)))  # a runtime 1
    normal = ~np.isnan(x) & ((np.abs(x) >= np.finfo(np.float32).tiny) | (x == 0) | np.isinf(x))
    np.testing.assert_array_equal(out[normal].view(np.uint32), x[normal].view(np.uint32))
    assert np.all(np.isnan(out[np.isnan(x)]))
    sub = ~normal & ~np.isnan(x)
    assert sub.sum() > 0  # the sample does hold subnormals
    np.testing.assert_array_equal(out[sub], times_one[sub])  # what XLA:CPU makes of them anyway
    np.testing.assert_array_equal(np.signbit(out[sub]), np.signbit(x[sub]))
    xb = jnp.asarray(x[normal]).astype(jnp.bfloat16)
    xb = xb[jnp.abs(xb.astype(jnp.float32)) >= float(jnp.finfo(jnp.bfloat16).tiny)]
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.materialize)(xb)).view(np.uint16),
                                  np.asarray(xb).view(np.uint16))
    g = jax.grad(lambda v: jnp.sum(layers.materialize(v) * 3.0))(jnp.asarray(x[normal][:100]))
    np.testing.assert_array_equal(g, np.full(100, 3.0, np.float32))  # gradient is the identity's too


def test_materialize_leaves_the_resnet_step_unchanged():
    """ResNet-32 outputs, loss and gradients with and without ``materialize`` agree bit for bit in float32."""
    x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
    y = jnp.arange(8) % 10
    on, off = resnet.resnet32(10, 1, materialize=True), resnet.resnet32(10, 1, materialize=False)
    params, stats = models.init(on, jax.random.key(0), (32, 32, 3))

    def loss_and_grads(model):
        def loss(p):
            z, new = model.apply({"params": p, "batch_stats": stats}, x, 0, train=True, mutable=["batch_stats"])
            return jnp.mean(jax.nn.log_softmax(z)[jnp.arange(8), y]), new

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_on, s_on), g_on = loss_and_grads(on)
    (l_off, s_off), g_off = loss_and_grads(off)
    np.testing.assert_array_equal(l_on, l_off)
    for a, b in zip(jax.tree.leaves((s_on, g_on)), jax.tree.leaves((s_off, g_off))):
        np.testing.assert_array_equal(a, b)


# --- one ResNet for the split backbone: stems, per-task kernels, weighted / frozen / shared batch norm ---


def test_resnet18_stems_share_imagenet_parameters_and_set_the_resolution():
    """The three 7x7 stems have ImageNet's tree; 32 px inputs reach stage 0 at 8 / 16 / 32 px (cifar: 32)."""
    x = jnp.zeros((1, 32, 32, 3))
    trees = {}
    for stem, side in (("imagenet", 8), ("no_pool", 16), ("stride1", 32), ("cifar", 32)):
        model = resnet.resnet18(10, stem=stem)
        params, stats = models.init(model, jax.random.key(0), (32, 32, 3))
        _, inter = model.apply({"params": params, "batch_stats": stats}, x, capture_intermediates=True,
                               mutable=["intermediates"])
        assert inter["intermediates"]["stage0_block0"]["__call__"][0].shape == (1, side, side, 64), stem
        trees[stem] = jax.tree.map(lambda a: a.shape, params)
    assert trees["imagenet"] == trees["no_pool"] == trees["stride1"] != trees["cifar"]
    with pytest.raises(ValueError, match="unknown stem"):
        resnet.resnet18(10, stem="tiny")


def test_per_task_conv_kernels_select_their_row_and_train_only_it():
    conv = layers.Conv(4, (3, 3), 1, padding=1, num_tasks=3)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
    params = conv.init(jax.random.key(1), x, 0)["params"]
    k = params["kernel"]
    assert k.shape == (3, 3, 3, 5, 4) and not np.array_equal(k[0], k[1])  # independent rows
    for t in range(3):
        np.testing.assert_array_equal(conv.apply({"params": params}, x, t), layers.conv2d(x, k[t], 1, 1))
    g = jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x, jnp.int32(2)) ** 2))(params)["kernel"]
    assert np.all(g[:2] == 0) and np.any(g[2] != 0)


def test_auto_lowering_uses_patches_on_small_maps_only():
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
    for side, impl in ((4, "patches"), (8, "xla")):
        x = jax.random.normal(jax.random.key(0), (2, side, side, 4))
        np.testing.assert_array_equal(layers.conv2d(x, w, 1, 1, "auto"), layers.conv2d(x, w, 1, 1, impl))


def test_task_batch_norm_weights_rows_and_frozen_mode():
    x = jax.random.normal(jax.random.key(0), (8, 3, 3, 4)) * 2 + 1
    w = jnp.array([1, 1, 0, 1, 0, 0, 1, 1], jnp.float32)
    bn = layers.TaskBatchNorm(3, param_rows=1)
    v = bn.init(jax.random.key(0), x, 0, False)
    assert v["params"]["scale"].shape == (1, 4) and v["batch_stats"]["mean"].shape == (3, 4)
    # weighted statistics are those of the weighted examples alone (output and running statistics)
    y_w, s_w = bn.apply(v, x, 2, True, w, mutable=["batch_stats"])
    y_s, s_s = bn.apply(v, x[w > 0], 2, True, mutable=["batch_stats"])
    np.testing.assert_allclose(y_w[w > 0], y_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_w["batch_stats"]["var"], s_s["batch_stats"]["var"], rtol=1e-5)
    moved = np.any(np.asarray(s_w["batch_stats"]["mean"]) != np.asarray(v["batch_stats"]["mean"]), axis=1)
    np.testing.assert_array_equal(moved, [False, False, True])
    # no weighted example: the statistics stay bit-identical
    _, s0 = bn.apply(v, x, 1, True, jnp.zeros(8), mutable=["batch_stats"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(v["batch_stats"])))
    # frozen: running statistics in training too, and they never move
    frozen = layers.TaskBatchNorm(1, use_running_average=True)
    vf = {"params": v["params"], "batch_stats": jax.tree.map(lambda a: a[:1] + 0.5, v["batch_stats"])}
    y_t, s_t = frozen.apply(vf, x, 0, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(y_t, frozen.apply(vf, x, 0, False))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s_t), jax.tree.leaves(vf["batch_stats"])))
