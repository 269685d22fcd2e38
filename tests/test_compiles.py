"""Compile stability: after the first task nothing compiles again, on a class split with unequal task sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modkd_jax import data, diagnostics, loop, training
from modkd_jax.methods import mind
from modkd_jax.task_inference import InferenceConfig


@pytest.mark.parametrize("rule", ["auto", "max_prob"])
def test_tasks_after_the_first_compile_nothing(rule):
    sc = data.build("class_split", data.load("digits"), 5, seed=0, val_fraction=0.1)
    sizes = {len(task.train.y) for task in sc.tasks}
    assert len(sizes) > 1  # the last partial batch and the split would change shape between tasks
    cfg = mind.MindConfig(arch="mlp", hidden=(32, 32), epochs=1, distill_epochs=1, batch_size=64, temperature=None,
                          crop_flip=False, eval_batch_size=128,
                          inference=InferenceConfig(task_inference=rule, gauss_components=2, gauss_rank=8))
    res = loop.run(mind.learner(cfg, sc), {"seed": 0}, None, echo=None)
    compiles = [info["compiles"] for info in res["task_infos"]]
    assert compiles[0] > 0  # the counter sees compiles at all
    assert compiles[1:] == [0, 0, 0, 0], compiles


def test_the_counter_counts_a_new_shape():
    f = jax.jit(lambda x: x * 2)
    three, four = np.ones(3, np.float32), np.ones(4, np.float32)
    f(three)
    before = diagnostics.backend_compiles()
    f(three)
    assert diagnostics.backend_compiles() == before
    f(four)
    assert diagnostics.backend_compiles() == before + 1


def test_a_padded_last_batch_trains_on_its_real_rows_only():
    """drop_last=False pads the last batch: what the padded rows hold reaches neither the loss nor the batch
    statistics (zeros or garbage there give bit-identical weights)."""
    sc = data.build("class_split", data.load("digits"), 5, seed=0, val_fraction=0.1)
    cfg = mind.MindConfig(arch="mlp", hidden=(16,), epochs=1, distill_epochs=1, batch_size=50, temperature=1.0,
                          crop_flip=False, inference=InferenceConfig(task_inference="max_prob"))
    m = mind.setup(cfg, sc)
    state = mind.init_state(m, jax.random.key(0))
    train = sc.tasks[0].train
    assert len(train.y) % 50  # a partial last batch
    everything = jax.tree.map(lambda o: o >= -1, state["owner"])
    ctx = mind.Context(jnp.int32(0), everything, everything)
    phase = training.Phase(2, 50, 1e-3, drop_last=False)
    extra = 77
    clean = training.place_split(train, len(train.y) + extra)
    dirty = training.DeviceSplit(jnp.concatenate([clean.x[:len(train.y)], jnp.full((extra, *train.x.shape[1:]), 255,
                                                                                     jnp.uint8)]),
                                 jnp.concatenate([clean.y[:len(train.y)], jnp.ones(extra, jnp.int32)]), len(train.y))
    carry = (state["params"], state["batch_stats"], m.txs["teacher"].init(state["params"]))
    out = [training.run_phase(m.steps["self_train"], jax.tree.map(jnp.copy, carry), split, ctx, phase,
                              jax.random.key(1)) for split in (clean, dirty)]  # the steps donate their carry
    for a, b in zip(jax.tree.leaves(out[0][:2]), jax.tree.leaves(out[1][:2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
