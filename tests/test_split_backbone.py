"""Split ResNet-18 for online CL: budget resolution, bit-exact freezing and task isolation, conversion, settings."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ocl
from modkd_jax import data, loop, models
from modkd_jax.methods import split_backbone as sb
from modkd_jax.methods import split_backbone_net as sbn
from modkd_jax.methods import split_backbone_step as sbs
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


def _train(step, gate, carry, x, y, task):
    """One step of ``training.make_step``'s split-backbone step on a full batch, gated by ``make_gate``."""
    valid = np.ones(len(y), bool)
    return step(carry, sbs.StreamBatch(x, y, jnp.asarray(task, jnp.int32), valid), jax.random.key(0),
                gate(carry[0], task, valid))


# ----------------------------------------------------------------------------- budget


@pytest.mark.parametrize("budget", ["6.5-2.3-2.4", "2.0-4.0-5.2", "0-0-11.2", "11.2-0-0", "3-3-5"])
def test_budget_groups_sum_to_the_parameter_count(budget):
    width = 10
    count = models.param_count(jax.eval_shape(lambda: sbn.random_init(width, jax.random.key(0)))[0])
    layers = sbn.layers_for(width)
    groups = sbn.resolve_budget(budget, layers)
    net = sbn.SplitBackbone(layers, groups, (width, width))
    sizes = net.sizes()
    assert sum(sizes.values()) == count == 11_181_642
    assert groups[-1] == "task"  # the head is always per task
    order = [sbn.GROUPS.index(g) for g in groups]
    assert order == sorted(order)  # frozen, then shared, then task-specific


def test_thesis_budget_resolves_to_the_expected_layer_boundaries():
    layers = sbn.layers_for(10)
    net = sbn.SplitBackbone(layers, sbn.resolve_budget("6.5-2.3-2.4", layers), (10,))
    assert net.layers_of("frozen")[-1].name == "stage3_block0.conv2"
    assert [layer.name for layer in net.layers_of("shared")] == ["stage3_block1.conv1"]
    assert [layer.name for layer in net.layers_of("task")] == ["stage3_block1.conv2", "head"]
    assert [round(v / 1e6, 2) for v in net.sizes().values()] == [6.46, 2.36, 2.37]
    assert "6.456M" in sbn.describe(net)


@pytest.mark.parametrize("bad", ["6.5-2.3", "a-b-c", "1-1-1", "-1-5-7"])
def test_bad_budgets_are_rejected(bad):
    with pytest.raises(ValueError):
        sbn.resolve_budget(bad, sbn.layers_for(10))


# ----------------------------------------------------------------------------- the one ResNet


def _view(net, params, stats, task):
    """Task ``task``'s rows of the task group (params, stats) and its shared-layer statistics, by path."""
    p, s = sbn.backbone_of(net, params, stats, task)
    return sbn.by_group(net, p)["task"], sbn.by_group(net, s)["task"], sbn.by_group(net, s)["shared"]


def test_split_tree_is_the_resnet_tree_with_task_rows():
    """build's tree is what net.model initialises; frozen: one row, shared: per-task statistics, task: rows."""
    net, params, stats = sbn.build("6.5-2.3-2.4", (CLASSES, 4, 7), jax.random.key(0), input_shape=SHAPE)
    want = jax.eval_shape(lambda: net.model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), 0, False))
    assert jax.tree.map(lambda a: a.shape, {"params": params, "batch_stats": stats}) == \
        jax.tree.map(lambda a: a.shape, dict(want))
    assert params["stage3_block0"]["conv2"]["kernel"].shape == (3, 3, 512, 512)  # frozen
    assert stats["stage3_block0"]["bn2"]["mean"].shape == (1, 512)
    assert params["stage3_block1"]["conv1"]["kernel"].shape == (3, 3, 512, 512)  # shared
    assert params["stage3_block1"]["bn1"]["scale"].shape == (1, 512) and stats["stage3_block1"]["bn1"]["var"].shape \
        == (3, 512)
    assert params["stage3_block1"]["conv2"]["kernel"].shape == (3, 3, 3, 512, 512)  # task rows
    assert params["classifier"]["kernel"].shape == (512, 3 * CLASSES)  # one class block per task
    sizes = {g: sum(a.size for a in leaves.values()) for g, leaves in sbn.by_group(net, params).items()}
    assert sizes == {"frozen": net.sizes()["frozen"], "shared": net.sizes()["shared"],
                     "task": 3 * net.sizes()["task"]}


def test_each_task_computes_the_plain_resnet18_of_its_rows():
    """Task t's logits (eval, and train with nothing frozen) equal models.resnet18 on ``backbone_of(t)``."""
    params, stats = sbn.random_init(CLASSES, jax.random.key(0), SHAPE)
    layers = sbn.layer_list(params)
    x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
    for groups in (sbn.resolve_budget("6.5-2.3-2.4", layers), ("shared",) * (len(layers) - 3) + ("task",) * 3):
        net, gp, gs = sbn.build(groups, (CLASSES, 6), jax.random.key(3), init=(params, stats), stem_mode="no_pool")
        noise = lambda t, k: jax.tree.map(  # noqa: E731  (rows differ, so picking the wrong one shows)
            lambda a: a + 0.2 * jax.random.uniform(jax.random.key(k), a.shape), t)
        gp, gs = noise(gp, 4), jax.tree.map(jnp.abs, noise(gs, 5))
        ref = models.resnet18(CLASSES, stem="no_pool")
        trains = (False,) if "frozen" in groups else (False, True)
        for t, train in ((t, train) for t in range(2) for train in trains):
            p, s = sbn.backbone_of(net, gp, gs, t)
            want = ref.apply({"params": p, "batch_stats": s}, x, 0, train=train, mutable=["batch_stats"])[0]
            got = jax.jit(lambda p, s, x: sbn.forward(net, p, s, x, t, train=train))(gp, gs, x)
            valid = np.arange(CLASSES) < net.block_sizes[t]
            np.testing.assert_allclose(got[:, valid], want[:, valid], rtol=1e-4, atol=1e-4)
            assert np.all(np.asarray(got[:, ~valid]) < -1e8)  # the classes task 1 lacks are masked
    # the plain tree round-trips: every task starts from the init weights and statistics
    net, gp, gs = sbn.build("6.5-2.3-2.4", (CLASSES, CLASSES), jax.random.key(3), init=(params, stats))
    for t in range(2):
        p, s = sbn.backbone_of(net, gp, gs, t)
        assert _same({k: v for k, v in p.items() if k != "classifier"},
                     {k: v for k, v in params.items() if k != "classifier"}) and _same(s, stats)


def test_frozen_layers_normalise_with_their_running_statistics_in_training():
    """With every layer but the head frozen, a training forward equals the eval one and moves no statistic."""
    layers = sbn.layers_for(CLASSES)
    net, params, stats = sbn.build(("frozen",) * (len(layers) - 1) + ("task",), (CLASSES,), jax.random.key(0),
                                  input_shape=SHAPE)
    stats = jax.tree.map(lambda a: a + 0.3, stats)
    x = jax.random.normal(jax.random.key(2), (6, *SHAPE))
    train, new = sbn.apply(net, params, stats, x, 0, True)
    np.testing.assert_array_equal(train, sbn.apply(net, params, stats, x, 0, False)[0])
    assert _same(new, stats)


# ----------------------------------------------------------------------------- freezing and isolation


@pytest.fixture(scope="module")
def two_tasks():
    """Train task 0 then task 1 (optimizer state carried over: momentum could leak); snapshots of every stage."""
    net, params, stats = sbn.build("6.5-2.3-2.4", (CLASSES, CLASSES), jax.random.key(0), stem_mode="imagenet",
                                  input_shape=SHAPE)
    tx = sbs.make_optimizer(net, lr_shared=1e-3, lr_task=1e-2, optimizer="sgd", momentum=0.9)
    step, gate = sbs.make_train_step(net, tx), sbs.make_gate(net)
    snap = lambda p, s: (jax.device_get(p), jax.device_get(s))  # noqa: E731
    start = snap(params, stats)
    carry = (params, stats, tx.init(params))
    for task in (0, 1):
        for i in range(3):
            x, y = _batch(10 * task + i)
            carry, m = _train(step, gate, carry, x, y, task)
            assert np.isfinite(float(m["loss"]))
        if task == 0:
            after0 = snap(*carry[:2])
    return net, start, after0, snap(*carry[:2])


def test_frozen_group_is_unchanged_bit_for_bit(two_tasks):
    net, start, after0, after1 = two_tasks
    group = lambda tree, g: sbn.by_group(net, tree)[g]  # noqa: E731
    assert len(group(start[0], "frozen")) == 18 * 3  # 18 layers: a kernel, BN scale and bias each
    for p, s in (after0, after1):
        assert _same(group(p, "frozen"), group(start[0], "frozen"))
        assert _same(group(s, "frozen"), group(start[1], "frozen"))
    assert not _same(group(after1[0], "shared"), group(after0[0], "shared"))  # the shared group does train
    assert not _same(group(after1[1], "shared"), group(after0[1], "shared"))  # ... and its BN statistics move


def test_task_copy_of_task_0_is_unchanged_while_task_1_trains(two_tasks):
    net, start, after0, after1 = two_tasks
    v, v0, v1 = ((lambda t, s=snap: _view(net, *s, t)) for snap in (start, after0, after1))
    assert not _same(v0(0)[0], v(0)[0])  # task 0 trained its rows and head block
    assert _same(v0(1), v(1))  # ... and left task 1's rows, statistics and shared-layer statistics alone
    assert _same(v1(0), v0(0))  # task 1 leaves task 0's params, BN statistics, shared-layer statistics exact
    assert not _same(v1(1)[0], v0(1)[0]) and not _same(v1(1)[1], v0(1)[1]) and not _same(v1(1)[2], v0(1)[2])


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


def _online(scenario, eval_batch=BATCH):
    cfg = sb.OCLConfig(split="6.5-2.3-2.4", batch_size=BATCH, stem_mode="imagenet", eval_batch=eval_batch)
    return sb.setup(cfg, scenario)


def test_setting1_learner_through_the_loop_isolates_tasks_and_counts_every_rule():
    """The Learner: one pass per task (last batch padded), every rule's row, task 0 kept while task 1 trains."""
    scenario = _scenario(n_train=40)
    m = _online(scenario)
    learner = sb.learner(m.cfg, scenario)
    assert learner.rules == sb.RULES and learner.tasks == ("dark", "bright")
    state = learner.init_state(jax.random.key(0))
    start = jax.device_get(state)
    state, info0 = learner.learn_task(state, 0, jax.random.key(1))
    after0 = jax.device_get(state)
    assert info0["steps"] == 2 and info0["examples"] == 40  # 40 examples: 32 + 8 (padded to 32)
    state, info1 = learner.learn_task(state, 1, jax.random.key(2))
    after1 = jax.device_get(state)
    frozen = lambda s: sbn.by_group(m.net, s["params"])["frozen"]  # noqa: E731
    assert _same(frozen(after1), frozen(start))
    view = lambda s, t: _view(m.net, s["params"], s["batch_stats"], t)  # noqa: E731
    assert _same(view(after0, 1), view(start, 1)) and _same(view(after1, 0), view(after0, 0))
    rows = learner.evaluate(state, 2)
    assert tuple(rows) == sb.RULES and all(r.shape == (2,) for r in rows.values())
    # the counts through evaluation.accuracies (padded batches of 7) are the model's own argmax on each split
    # (to within one example: other batch shapes may round a near tie the other way)
    n = len(scenario.tasks[0].test.y)
    padded = sb.evaluate(_online(scenario, eval_batch=7), state, 2)
    for rule in sb.RULES:
        np.testing.assert_allclose(padded[rule], rows[rule], atol=1.01 / n, err_msg=rule)
    mean, std = np.asarray(m.net.mean), np.asarray(m.net.std)
    for t, task in enumerate(scenario.tasks):
        xf = (task.test.x / 255.0 - mean) / std
        z = sbn.forward(m.net, state["params"], state["batch_stats"], jnp.asarray(xf, jnp.float32), t)
        assert abs(rows["til"][t] - np.mean(np.argmax(np.asarray(z), -1) == task.test.y)) <= 1.01 / n
    res = loop.run(learner, {"seed": 0}, None, echo=None)
    assert res["groups"]["frozen"]["params"] == m.net.sizes()["frozen"] and res["split"] == "6.5-2.3-2.4"
    R = {r: np.asarray(v, float) for r, v in res["accuracy_matrix"].items()}
    assert set(R) == set(sb.RULES) and all(v.shape == (2, 2) for v in R.values())
    assert np.all(np.isfinite(R["til"]))  # every task is evaluated after every task
    assert np.all(R["cil"] <= R["task_id"])  # right class under the inferred task needs the right task


def test_setting2_trains_on_the_merged_stream_and_identifies_tasks():
    scenario = _scenario()
    m = _online(scenario)
    before = jax.device_get(sb.init_state(m, jax.random.key(0)))
    logs = []
    state, accs, info = sb.setting2(m, jax.random.key(0), seed=0, log=logs.append)
    assert set(accs) == set(sb.RULES) and all(a.shape == (2,) for a in accs.values())
    for rule, a in accs.items():
        assert np.all((0 <= a) & (a <= 1)), rule
    assert np.all(accs["cil"] <= accs["task_id"])  # right class under the inferred task needs the right task
    assert info["steps"] == 3 and info["examples"] == 96 and logs[0]["steps"] == 3  # 96 seen once, last padded
    for t in range(2):  # both copies learned from their own examples in the mixed batches
        after = _view(m.net, state["params"], state["batch_stats"], t)
        prev = _view(m.net, before["params"], before["batch_stats"], t)
        assert not _same(after[0], prev[0]) and not _same(after[1], prev[1])


def test_mixed_batch_statistics_only_move_for_tasks_present():
    scenario = _scenario()
    net, params, stats = sbn.build("6.5-2.3-2.4", scenario.block_sizes, jax.random.key(0), stem_mode="imagenet",
                                  input_shape=SHAPE)
    tx = sbs.make_optimizer(net, 1e-3, 1e-2)
    step, gate = sbs.make_train_step(net, tx, mixed=True), sbs.make_gate(net)
    before = [_view(net, *jax.device_get((params, stats)), t) for t in range(2)]
    x, y = _batch(0)
    task = np.zeros(len(y), np.int32)  # only task 0 in this batch
    (params, stats, _), _ = _train(step, gate, (params, stats, tx.init(params)), x, y, task)
    after = [_view(net, params, stats, t) for t in range(2)]
    assert _same(after[1], before[1])  # task 1: its rows, its BN statistics, its shared-layer statistics
    assert all(not _same(a, b) for a, b in zip(after[0], before[0]))


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
    like = jax.eval_shape(lambda: sbn.random_init(7, jax.random.key(0)))
    sbn.check_backbone(params, stats, like)  # our tree, our shapes
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
    got = sbn.reference_model(5).apply({"params": params, "batch_stats": stats}, jnp.asarray(x), 0, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_init_file_and_pretraining_give_the_starting_backbone(tmp_path):
    path = tmp_path / "tv.npz"
    np.savez(path, **_torchvision_state_dict())
    cfg = {"init": str(path), "pretrain": None}
    init = ocl.initial_backbone(cfg, tmp_path)
    net, params, stats = sbn.build("6.5-2.3-2.4", (CLASSES, CLASSES), jax.random.key(0), init=init, input_shape=SHAPE)
    file_p, file_s = convert.torchvision_to_flax(_torchvision_state_dict())
    np.testing.assert_array_equal(params["stem"]["kernel"], file_p["stem"]["kernel"])
    for t in range(2):  # every task copy starts from the file's weights and statistics
        np.testing.assert_array_equal(params["stage3_block1"]["conv2"]["kernel"][t],
                                      file_p["stage3_block1"]["conv2"]["kernel"])
        np.testing.assert_array_equal(stats["stage3_block1"]["bn1"]["var"][t], file_s["stage3_block1"]["bn1"]["var"][0])
    # pre-training on a source set moves every layer and is cached in the workdir
    cfg = {"init": "random", "pretrain": "digits", "pretrain_subset": 64, "pretrain_epochs": 1, "pretrain_batch": 32,
           "pretrain_lr": 1e-3, "image_shape": list(SHAPE), "stem_mode": "imagenet", "seed": 0}
    p1, s1 = ocl.initial_backbone(cfg, tmp_path, echo=lambda *_: None)
    p0, s0 = sbn.random_init(10, jax.random.fold_in(jax.random.key(0), 1), SHAPE)
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
    for name in ("config.json", "results.json", "accuracy_matrices.png", "ocl_summary.png"):
        assert (workdir / name).is_file(), name
    p1, p2 = workdir / "s1_6.5-2.3-2.4_b32", workdir / "s2_6.5-2.3-2.4_b32"
    for part in (p1, p2):  # every part is a run directory with results.json in the loop's schema
        part_res = json.loads((part / "results.json").read_text())
        assert part_res["schema"] == loop.SCHEMA and part_res["tasks"] == ["mnist", "fashion_mnist"]
        assert part_res["config"]["batch_size"] == 32 and (part / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (p1 / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    res = json.loads((workdir / "results.json").read_text())
    s1, s2 = res["runs"]["s1_6.5-2.3-2.4_b32"], res["runs"]["s2_6.5-2.3-2.4_b32"]
    R = np.asarray(s1["R"]["til"])
    assert R.shape == (2, 2) and s1["val1"] == list(np.diag(R)) and s1["val2"] == list(R[-1])
    assert s1["R"] == json.loads((p1 / "results.json").read_text())["accuracy_matrix"]  # read from the part
    assert s1["forgetting"] == pytest.approx(R[0, 0] - R[1, 0])
    assert len(s2["acc"]["task_id"]) == 2 and 0 <= s2["mean"]["task_id"] <= 1
    assert res["examples"] == {"train": [64, 64], "test": [32, 32]}
    # the same command resumes: every part is already there
    assert ocl.main(argv) == 0
    assert "finished" not in capsys.readouterr().out
    # a Setting 1 part stopped after its first task resumes there, to the same matrices
    shutil.rmtree(p1 / "checkpoints" / "2")
    (p1 / "results.json").unlink()
    assert ocl.main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "after task 0" in out and "finished s1_6.5-2.3-2.4_b32" in out
    assert "finished s2" not in out
    again = json.loads((workdir / "results.json").read_text())["runs"]
    assert again["s1_6.5-2.3-2.4_b32"]["R"] == s1["R"] and again["s2_6.5-2.3-2.4_b32"]["acc"] == s2["acc"]
    # bad input: one line, exit 2, nothing written
    assert ocl.main(["--splits", "6.5-2.3", "--workdir", str(tmp_path / "bad")]) == 2
    assert ocl.main(["--datasets", "mnist", "--workdir", str(tmp_path / "bad")]) == 2
    assert ocl.main(["--init", str(tmp_path / "missing.npz"), "--workdir", str(tmp_path / "bad")]) == 2
    np.savez(tmp_path / "small.npz", **{"params/stem/kernel": np.zeros((3, 3, 3, 64), np.float32)})
    assert ocl.main(["--init", str(tmp_path / "small.npz"), "--workdir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert not (tmp_path / "bad").exists()
