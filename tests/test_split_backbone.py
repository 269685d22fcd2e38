"""Split ResNet-18 for online CL: budget resolution, bit-exact freezing and task isolation, conversion, settings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ocl
from modkd_jax import data, models
from modkd_jax.methods import split_backbone as sb
from modkd_jax.models import convert

SHAPE = (16, 16, 3)  # small inputs keep compile and step times low
BATCH, CLASSES = 32, 10  # as in the CLI test below, so the compiled steps are shared (persistent cache)


def _bits(tree):
    """Every leaf's raw bits, so -0.0 vs +0.0 and NaN payloads count as changes."""
    return [np.asarray(a).view(np.uint32).copy() for a in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def _batch(seed, n=BATCH, classes=CLASSES):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int32)


# ----------------------------------------------------------------------------- budget


@pytest.mark.parametrize("budget", ["6.5-2.3-2.4", "2.0-4.0-5.2", "0-0-11.2", "11.2-0-0", "3-3-5"])
def test_budget_groups_sum_to_the_parameter_count(budget):
    width = 10
    count = models.param_count(jax.eval_shape(lambda: sb.random_init(width, jax.random.key(0)))[0])
    layers = sb.layers_for(width)
    groups = sb.resolve_budget(budget, layers)
    net = sb.SplitBackbone(layers, groups, (width, width))
    sizes = net.sizes()
    assert sum(sizes.values()) == count == 11_181_642
    assert groups[-1] == "task"  # the head is always per task
    order = [sb.GROUPS.index(g) for g in groups]
    assert order == sorted(order)  # frozen, then shared, then task-specific


def test_thesis_budget_resolves_to_the_expected_layer_boundaries():
    layers = sb.layers_for(10)
    net = sb.SplitBackbone(layers, sb.resolve_budget("6.5-2.3-2.4", layers), (10,))
    assert net.layers_of("frozen")[-1].name == "stage3_block0.conv2"
    assert [layer.name for layer in net.layers_of("shared")] == ["stage3_block1.conv1"]
    assert [layer.name for layer in net.layers_of("task")] == ["stage3_block1.conv2", "head"]
    assert [round(v / 1e6, 2) for v in net.sizes().values()] == [6.46, 2.36, 2.37]
    assert "6.456M" in sb.describe(net)


@pytest.mark.parametrize("bad", ["6.5-2.3", "a-b-c", "1-1-1", "-1-5-7"])
def test_bad_budgets_are_rejected(bad):
    with pytest.raises(ValueError):
        sb.resolve_budget(bad, sb.layers_for(10))


# ----------------------------------------------------------------------------- forward pass


def test_forward_matches_the_flax_resnet18():
    """Eval mode equals models.resnet18 (ImageNet stem); with nothing frozen, train mode too."""
    model = sb.reference_model(CLASSES)
    params, stats = sb.random_init(CLASSES, jax.random.key(0), SHAPE)
    stats = jax.tree.map(lambda a: a + 0.2 * jax.random.uniform(jax.random.key(1), a.shape), stats)
    x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
    layers = sb.layer_list(params)
    groups = ("shared",) * (len(layers) - 3) + ("task",) * 3
    net, gp, gs = sb.build(groups, (CLASSES,), jax.random.key(3), init=(params, stats), stem_mode="imagenet")
    head = {"kernel": params["classifier"]["kernel"][None], "bias": params["classifier"]["bias"][None]}
    gp["task"]["head"] = head  # build re-initialises heads; use the model's for the comparison
    for train in (False, True):
        want = jax.jit(lambda v, x: model.apply(v, x, 0, train=train, mutable=["batch_stats"])[0])(
            {"params": params, "batch_stats": stats}, x)
        got = jax.jit(lambda p, s, x: sb.forward(net, p, s, x, 0, train=train))(gp, gs, x)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # the backbone tree round-trips through the per-layer layout
    p2, s2 = sb.backbone_of(net, gp, gs, 0)
    assert _same(p2, params) and _same(s2, stats)


# ----------------------------------------------------------------------------- freezing and isolation


@pytest.fixture(scope="module")
def two_tasks():
    """Train task 0 then task 1 (optimizer state carried over: momentum could leak); snapshots of every stage."""
    net, params, stats = sb.build("6.5-2.3-2.4", (CLASSES, CLASSES), jax.random.key(0), stem_mode="imagenet",
                                  input_shape=SHAPE)
    tx = sb.make_optimizer(lr_shared=1e-3, lr_task=1e-2, optimizer="sgd", momentum=0.9)
    step = sb.make_train_step(net, tx)
    snap = lambda p, s: (jax.device_get(p), jax.device_get(s))  # noqa: E731
    start = snap(params, stats)
    carry = (params, stats, tx.init(params))
    for task in (0, 1):
        for i in range(3):
            x, y = _batch(10 * task + i)
            carry, m = step(carry, x, y, jnp.int32(task), np.ones(len(y), bool))
            assert np.isfinite(float(m["loss"]))
        if task == 0:
            after0 = snap(*carry[:2])
    return net, start, after0, snap(*carry[:2])


def test_frozen_group_is_unchanged_bit_for_bit(two_tasks):
    _, start, after0, after1 = two_tasks
    for p, s in (after0, after1):
        assert _same(p["frozen"], start[0]["frozen"]) and _same(s["frozen"], start[1]["frozen"])
    assert not _same(after1[0]["shared"], after0[0]["shared"])  # the shared group does train
    assert not _same(after1[1]["shared"], after0[1]["shared"])  # ... and its BN statistics move


def test_task_copy_of_task_0_is_unchanged_while_task_1_trains(two_tasks):
    _, start, after0, after1 = two_tasks
    row = lambda tree, t: jax.tree.map(lambda a: a[t], tree)  # noqa: E731
    assert not _same(row(after0[0]["task"], 0), row(start[0]["task"], 0))  # task 0 trained its copy
    assert _same(row(after0[0]["task"], 1), row(start[0]["task"], 1))  # ... and left copy 1 alone
    assert _same(row(after1[0]["task"], 0), row(after0[0]["task"], 0))  # params of copy 0 exact
    assert _same(row(after1[1]["task"], 0), row(after0[1]["task"], 0))  # BN statistics of copy 0 exact
    assert _same(row(after1[1]["shared"], 0), row(after0[1]["shared"], 0))  # task 0's shared-layer statistics
    assert not _same(row(after1[1]["shared"], 1), row(after0[1]["shared"], 1))
    assert not _same(row(after1[0]["task"], 1), row(after0[0]["task"], 1))


# ----------------------------------------------------------------------------- Setting 2


def _scenario(n_train=48, n_test=BATCH):
    """Two tiny synthetic datasets: dark images (task 0) and bright ones (task 1), 10 classes each."""
    rng = np.random.default_rng(0)
    sets = []
    for name, lo in (("dark", 0), ("bright", 160)):
        make = lambda n: (rng.integers(lo, lo + 96, (n, *SHAPE), dtype=np.uint8),  # noqa: E731
                          rng.integers(0, CLASSES, n).astype(np.int32))
        (tx, ty), (ex, ey) = make(n_train), make(n_test)
        sets.append(data.Dataset(name, tx, ty, ex, ey, CLASSES))
    return data.dataset_sequence(sets, shape=SHAPE, val_fraction=0.0)


def test_setting2_trains_on_the_merged_stream_and_identifies_tasks():
    scenario = _scenario()
    net, params, stats = sb.build("6.5-2.3-2.4", scenario.block_sizes, jax.random.key(0), stem_mode="imagenet",
                                  input_shape=SHAPE)
    before = jax.device_get(params["task"])
    tx = sb.make_optimizer(1e-3, 1e-2)
    logs = []
    params, stats, accs = sb.setting2(net, params, stats, scenario, batch_size=BATCH, tx=tx, seed=0,
                                      eval_splits=[t.test for t in scenario.tasks], eval_batch=BATCH,
                                      log=logs.append)
    assert set(accs) == set(sb.RULES) and all(a.shape == (2,) for a in accs.values())
    for rule, a in accs.items():
        assert np.all((0 <= a) & (a <= 1)), rule
    assert np.all(accs["cil"] <= accs["task_id"])  # right class under the inferred task needs the right task
    assert logs[0]["steps"] == 3 and logs[0]["examples"] == 96  # 96 examples seen once, last batch padded
    after = jax.device_get(params["task"])
    for t in range(2):  # both copies learned from their own examples in the mixed batches
        assert not _same(jax.tree.map(lambda a: a[t], after), jax.tree.map(lambda a: a[t], before))


def test_mixed_batch_statistics_only_move_for_tasks_present():
    scenario = _scenario()
    net, params, stats = sb.build("6.5-2.3-2.4", scenario.block_sizes, jax.random.key(0), stem_mode="imagenet",
                                  input_shape=SHAPE)
    tx = sb.make_optimizer(1e-3, 1e-2)
    step = sb.make_train_step(net, tx, mixed=True)
    before = jax.device_get((params["task"], stats["task"], stats["shared"]))
    x, y = _batch(0)
    task = np.zeros(len(y), np.int32)  # only task 0 in this batch
    (params, stats, _), _ = step((params, stats, tx.init(params)), x, y, task, np.ones(len(y), bool))
    after = jax.device_get((params["task"], stats["task"], stats["shared"]))
    row = lambda tree, t: jax.tree.map(lambda a: a[t], tree)  # noqa: E731
    assert _same(row(after, 1), row(before, 1))  # task 1: copy, its BN statistics, shared-layer statistics
    assert all(not _same(row(a, 0), row(b, 0)) for a, b in zip(after, before))


# ----------------------------------------------------------------------------- conversion


def _torchvision_state_dict(seed=0, classes=7):
    """A synthetic torchvision ResNet-18 state dict (names and OIHW shapes written out independently)."""
    rng = np.random.default_rng(seed)
    sd = {}

    def bn(name, c):
        sd.update({f"{name}.weight": rng.uniform(0.5, 1.5, c), f"{name}.bias": rng.normal(0, 0.1, c),
                   f"{name}.running_mean": rng.normal(0, 0.1, c), f"{name}.running_var": rng.uniform(0.5, 1.5, c),
                   f"{name}.num_batches_tracked": np.array(7)})

    sd["conv1.weight"] = rng.normal(0, 0.1, (64, 3, 7, 7))
    bn("bn1", 64)
    cin = 64
    for layer, cout in zip(range(1, 5), (64, 128, 256, 512)):
        for b in range(2):
            p = f"layer{layer}.{b}"
            sd[f"{p}.conv1.weight"] = rng.normal(0, 0.05, (cout, cin if b == 0 else cout, 3, 3))
            bn(f"{p}.bn1", cout)
            sd[f"{p}.conv2.weight"] = rng.normal(0, 0.05, (cout, cout, 3, 3))
            bn(f"{p}.bn2", cout)
            if b == 0 and layer > 1:
                sd[f"{p}.downsample.0.weight"] = rng.normal(0, 0.05, (cout, cin, 1, 1))
                bn(f"{p}.downsample.1", cout)
        cin = cout
    sd["fc.weight"], sd["fc.bias"] = rng.normal(0, 0.05, (classes, 512)), rng.normal(0, 0.05, classes)
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def test_converter_round_trip_and_files(tmp_path, capsys):
    sd = _torchvision_state_dict()
    params, stats = convert.torchvision_to_flax(sd)
    like = jax.eval_shape(lambda: sb.random_init(7, jax.random.key(0)))
    sb.check_backbone(params, stats, like)  # our tree, our shapes
    assert params["classifier"]["kernel"].shape == (512, 7)
    back = convert.flax_to_torchvision(params, stats)
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
    assert all(np.array_equal(back[k], sd[k]) for k in back)
    # files: a torchvision .npz converts through the CLI and loads either way
    src, dst = tmp_path / "tv.npz", tmp_path / "ours.npz"
    np.savez(src, **sd)
    assert convert.main([str(src), str(dst)]) == 0
    for path in (src, dst):
        p, s = convert.load_any(path)
        assert _same(p, params) and _same(s, stats)
    assert convert.main([str(dst), str(tmp_path / "x.npz")]) == 2  # ours is not a torchvision file
    assert "not a torchvision" in capsys.readouterr().err
    del sd["layer3.0.downsample.0.weight"]
    with pytest.raises(convert.ConversionError, match="downsample"):
        convert.torchvision_to_flax(sd)


def test_converted_weights_compute_what_torch_computes():
    """Eval-mode logits of the converted net equal a torch (functional) ResNet-18 on the same state dict."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    sd = _torchvision_state_dict(classes=5)
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)

    def tbn(h, name):
        return F.batch_norm(h, t[f"{name}.running_mean"], t[f"{name}.running_var"], t[f"{name}.weight"],
                            t[f"{name}.bias"], False, 0.0, 1e-5)

    h = torch.from_numpy(x).permute(0, 3, 1, 2)
    h = F.max_pool2d(F.relu(tbn(F.conv2d(h, t["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer in range(1, 5):
        for b in range(2):
            p, stride = f"layer{layer}.{b}", 2 if (b == 0 and layer > 1) else 1
            y = F.relu(tbn(F.conv2d(h, t[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            y = tbn(F.conv2d(y, t[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            sc = tbn(F.conv2d(h, t[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") \
                if f"{p}.downsample.0.weight" in t else h
            h = F.relu(sc + y)
    want = F.linear(h.mean((2, 3)), t["fc.weight"], t["fc.bias"]).numpy()
    params, stats = convert.torchvision_to_flax(sd)
    got = sb.reference_model(5).apply({"params": params, "batch_stats": stats}, jnp.asarray(x), 0, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_init_file_and_pretraining_give_the_starting_backbone(tmp_path):
    path = tmp_path / "tv.npz"
    np.savez(path, **_torchvision_state_dict())
    cfg = {"init": str(path), "pretrain": None}
    init = ocl.initial_backbone(cfg, tmp_path)
    net, params, stats = sb.build("6.5-2.3-2.4", (CLASSES, CLASSES), jax.random.key(0), init=init, input_shape=SHAPE)
    file_p, file_s = convert.torchvision_to_flax(_torchvision_state_dict())
    np.testing.assert_array_equal(params["frozen"]["stem"]["kernel"], file_p["stem"]["kernel"])
    for t in range(2):  # every task copy starts from the file's weights and statistics
        np.testing.assert_array_equal(params["task"]["stage3_block1.conv2"]["kernel"][t],
                                      file_p["stage3_block1"]["conv2"]["kernel"])
        np.testing.assert_array_equal(stats["shared"]["stage3_block1.conv1"]["var"][t],
                                      file_s["stage3_block1"]["bn1"]["var"][0])
    # pre-training on a source set moves every layer and is cached in the workdir
    cfg = {"init": "random", "pretrain": "digits", "pretrain_subset": 64, "pretrain_epochs": 1, "pretrain_batch": 32,
           "pretrain_lr": 1e-3, "image_shape": list(SHAPE), "stem_mode": "imagenet", "seed": 0}
    p1, s1 = ocl.initial_backbone(cfg, tmp_path, echo=lambda *_: None)
    p0, s0 = sb.random_init(10, jax.random.fold_in(jax.random.key(0), 1), SHAPE)
    for tree, ref in ((p1, p0), (s1, s0)):
        flat, flat0 = convert.flatten(tree), convert.flatten(jax.device_get(ref))
        assert set(flat) == set(flat0) and all(flat[k].shape == flat0[k].shape for k in flat)
        assert all(not np.array_equal(flat[k], flat0[k]) for k in flat)
    assert (tmp_path / "pretrained_backbone.npz").is_file()
    p2, s2 = ocl.initial_backbone(cfg, tmp_path, echo=lambda *_: None)
    assert _same(p2, p1) and _same(s2, s1)


# ----------------------------------------------------------------------------- CLI


def test_ocl_cli_end_to_end_and_resume(tmp_path, shared_data, capsys):
    workdir = tmp_path / "run"
    argv = ["--datasets", "mnist", "fashion_mnist", "--splits", "6.5-2.3-2.4", "--batch_sizes", "32",
            "--train_subset", "64", "--test_subset", "32", "--image_size", "16", "--stem_mode", "imagenet",
            "--data_dir", str(shared_data), "--workdir", str(workdir)]
    assert ocl.main(argv) == 0
    out = capsys.readouterr().out
    assert "Val1" in out and "task-ID max-p" in out and "frozen   6.456M" in out and "(subsets)" in out
    for name in ("config.json", "metrics.jsonl", "results.json", "accuracy_matrices.png", "ocl_summary.png"):
        assert (workdir / name).is_file(), name
    res = json.loads((workdir / "results.json").read_text())
    s1, s2 = res["runs"]["s1_6.5-2.3-2.4_b32"], res["runs"]["s2_6.5-2.3-2.4_b32"]
    R = np.asarray(s1["R"]["til"])
    assert R.shape == (2, 2) and s1["val1"] == list(np.diag(R)) and s1["val2"] == list(R[-1])
    assert s1["forgetting"] == pytest.approx(R[0, 0] - R[1, 0])
    assert len(s2["acc"]["task_id"]) == 2 and 0 <= s2["mean"]["task_id"] <= 1
    assert res["examples"] == {"train": [64, 64], "test": [32, 32]}
    # the same command resumes: every part is already there
    assert ocl.main(argv) == 0
    assert "finished" not in capsys.readouterr().out
    # bad input: one line, exit 2, nothing written
    assert ocl.main(["--splits", "6.5-2.3", "--workdir", str(tmp_path / "bad")]) == 2
    assert ocl.main(["--datasets", "mnist", "--workdir", str(tmp_path / "bad")]) == 2
    assert ocl.main(["--init", str(tmp_path / "missing.npz"), "--workdir", str(tmp_path / "bad")]) == 2
    np.savez(tmp_path / "small.npz", **{"params/stem/kernel": np.zeros((3, 3, 3, 64), np.float32)})
    assert ocl.main(["--init", str(tmp_path / "small.npz"), "--workdir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert not (tmp_path / "bad").exists()
