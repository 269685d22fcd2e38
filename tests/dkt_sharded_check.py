"""Run by tests/test_dkt.py in a subprocess: 8 CPU devices, sharded DKT agents vs the vmapped run.

Exits 0 and prints ``OK`` when (1) the ppermute exchange equals ``jnp.roll`` for
every shift on 2-, 4- and 8-device meshes, (2) an 8-agent run sharded one agent
per device equals the same run vmapped on one device, in both exchange modes,
(3) the sharded train step compiles to no cross-device communication and (4)
in probe mode the only thing crossing devices is the probe-set logits, and (5) a
sharded run stopped after 2 experiences and resumed by ``loop.run`` from its
orbax checkpoint gives the uninterrupted run's matrices.
XLA_FLAGS must be set before JAX starts, hence a separate process.

The runs use SGD: batched (vmapped) and per-device matmuls round differently
(~1e-7), and Adam turns rounding noise in gradients that are mathematically
zero (first-layer weights fed by always-constant border pixels, whose gradient
batch norm cancels) into full +-lr steps, so with Adam the two paths agree in
accuracy (within ~2 test images per task here) but not weight for weight.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.extend  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modkd_jax import agents, data, loop  # noqa: E402
from modkd_jax.methods import dkt, dkt_data  # noqa: E402

AGENTS, TASKS = 8, 5
COLLECTIVES = ("ppermute", "psum", "all_gather", "all_to_all", "pmax", "pmin", "reduce_scatter", "psum_scatter")


def check_exchange():
    """shift_agents with ppermute inside shard_map == jnp.roll, for every shift and mesh size."""
    tree = {"a": jnp.arange(AGENTS * 6, dtype=jnp.float32).reshape(AGENTS, 3, 2),
            "b": jnp.arange(AGENTS, dtype=jnp.int32) * 7}
    for devices in (2, 4, 8):
        mesh = agents.make_mesh(devices)
        placed = agents.place(tree, mesh)
        for shift in range(AGENTS + 2):
            got = agents.shift_agents(placed, shift, mesh)
            want = jax.tree.map(lambda x: jnp.roll(x, -shift, 0), tree)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def primitives(jaxpr) -> list:
    """Every equation of a jaxpr, those of sub-jaxprs (jit, shard_map, vmap bodies) included."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(primitives(sub))
    return out


def run(world):
    """Train every experience through the Learner; return the final state, progress and accuracy rows."""
    learner, rows = dkt.learner(world), []
    state = learner.init_state(jax.random.key(0))
    for t in range(world.task_count):
        state, _ = learner.learn_task(state, t, jax.random.key(t))
        rows.append(learner.evaluate(state, t + 1))
    prog = state["progress"]
    return state, {"rounds": int(prog["rounds"]), "bytes_sent": [int(b) for b in prog["bytes_sent"]]}, rows


def check_runs(ds, mode):
    """Both paths with SGD, whose updates are linear in the gradients (see the module docstring)."""
    cfg = dkt.DKTConfig(agents=AGENTS, hidden=(32, 32), epochs=1, batch_size=32, probe_batch_size=16, n_probe=64,
                        lr=0.05, optimizer="sgd", exchange=mode, topology="gossip" if mode == "probe" else "ring",
                        eval_batch_size=360)
    vmapped = dkt.setup(cfg, ds, TASKS, seed=3, agent_devices=1)
    sharded = dkt.setup(cfg, ds, TASKS, seed=3, agent_devices=8)
    s_v, p_v, r_v = run(vmapped)
    s_s, p_s, r_s = run(sharded)
    for leaf in jax.tree.leaves(s_s["learners"]["params"]):  # one agent per device, really sharded
        assert leaf.sharding.spec == P(agents.AXIS) and len(leaf.sharding.device_set) == 8, leaf.sharding
        assert all(sh.data.shape[0] == 1 for sh in leaf.addressable_shards)
    assert p_v == p_s, (p_v, p_s)
    worst = 0.0
    for a, b in zip(jax.tree.leaves((s_v["learners"], s_v["inbox"])), jax.tree.leaves((s_s["learners"], s_s["inbox"]))):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
            worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
        else:
            np.testing.assert_array_equal(a, b)
    for rv, rs in zip(r_v, r_s):
        for k in rv:
            np.testing.assert_allclose(rv[k], rs[k], atol=1.5 / len(ds.test_y))  # at most one test image flips
    print(f"{mode}: sharded == vmapped (max |diff| {worst:.2e}), rounds {p_s['rounds']}")
    return sharded, s_s, r_s


def check_resume(world, rows):
    """A sharded run stopped after 2 experiences and resumed equals the uninterrupted one (``rows``)."""
    with tempfile.TemporaryDirectory() as tmp:
        loop.run(dkt.learner(world), {"seed": world.seed}, tmp, stop_after=2, echo=None)
        res = loop.run(dkt.learner(world), {"seed": world.seed}, tmp, echo=None)
    for t, row in enumerate(rows):
        for k, v in row.items():
            np.testing.assert_array_equal(np.asarray(res["accuracy_matrix"][k], float)[:, t], v)
    print("resume: sharded run resumed after 2 experiences == uninterrupted")


def check_traffic(world, state):
    """The sharded step has no collective; the probe exchange moves only (1, n_probe, C) logits per device."""
    t = 0
    seen = np.stack([agents.class_mask(s, t + 1, world.num_classes) for s in world.scenarios])
    data_t = dkt_data.experience_data(world, [s.tasks[t].train for s in world.scenarios], seen, world.mesh)
    per_agent, shared, _ = dkt_data.epoch_inputs(world, data_t, 1.0, dkt_data.epoch_rngs(world, 0, AGENTS, t, 0),
                                            dkt_data.epoch_keys(world, 0, AGENTS, t, 0), world.mesh)
    inbox = state["inbox"]
    step_jaxpr = jax.make_jaxpr(world.fns["step"])(state["learners"], inbox["message"], inbox["has_teacher"],
                                                   per_agent, shared)
    names = {e.primitive.name for e in primitives(step_jaxpr.jaxpr)}
    assert "shard_map" in names and not names & set(COLLECTIVES), names
    hlo = world.fns["step"].lower(state["learners"], inbox["message"], inbox["has_teacher"], per_agent,
                                  shared).compile().as_text()
    assert not any(op in hlo for op in ("collective-permute", "all-reduce", "all-gather", "all-to-all")), "comm"
    message = dkt.send(world, state["learners"], seen, world.mesh)
    moves = []
    for shift in range(1, AGENTS):
        jaxpr = jax.make_jaxpr(lambda m: agents.shift_agents(m, shift, world.mesh))(message)
        moves += [tuple(v.aval.shape) for e in primitives(jaxpr.jaxpr) if e.primitive.name == "ppermute"
                  for v in e.invars]
    assert moves and set(moves) == {(1, world.cfg.n_probe, world.num_classes)}, set(moves)
    print(f"probe traffic: only {set(moves)} float32 logits cross devices")


def main():
    assert jax.device_count() == 8, jax.devices()
    check_exchange()
    print("exchange: ppermute == roll for shifts 0..9 on 2/4/8 devices")
    ds = data.load("digits")
    world, state, rows = check_runs(ds, "probe")
    check_traffic(world, state)
    check_resume(world, rows)
    check_runs(ds, "weights")
    print("OK")


if __name__ == "__main__":
    main()
