"""Run by tests/test_collective.py in a subprocess: 2 CPU devices, 4 collective agents sharded vs vmapped.

Exits 0 and prints ``OK`` when a 4-agent collective run with the agents axis
sharded over 2 devices (2 agents per device, the relay crossing devices by
ppermute) sends exactly the messages, builds exactly the tables and bytes of
the same run vmapped on one device, and its students' test predictions agree
(Adam turns ~1e-7 rounding differences between batched and per-device matmuls
into small weight differences, see dkt_sharded_check.py: predictions are
compared at the same gates, allowing 1 % of the test images to differ).
XLA_FLAGS must be set before JAX starts, hence a separate process.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modkd_jax import data  # noqa: E402
from modkd_jax.methods import collective, mind  # noqa: E402

CFG = collective.CollectiveConfig(agents=4, task_count=5, n_probe=120, student_hidden=(64,), student_epochs=2,
                                  joint_epochs=1, batch_size=32, eval_batch_size=400, topology="gossip")
MIND = mind.preset_config("digits", epochs=2, distill_epochs=2, hidden=(32, 32))


def run(devices: int):
    world = collective.setup(CFG, data.load("digits"), MIND, seed=3, agent_devices=devices)
    assert (world.mesh is None) == (devices == 1)
    state, trace = collective.init_state(world, jax.random.key(0)), []
    for r in range(world.rounds):
        state, _ = collective.learn_round(world, state, r, jax.random.fold_in(jax.random.key(1), r), trace=trace)
    return world, state, trace


def main() -> int:
    assert jax.device_count() == 2
    (w1, s1, t1), (w2, s2, t2) = run(1), run(2)
    assert len(t1) == len(t2) > 0
    for m1, m2 in zip(t1, t2):
        for key in m1:
            np.testing.assert_array_equal(m1[key], m2[key])
    for v in collective.VARIANTS:
        np.testing.assert_array_equal(np.asarray(s1["tables"][v]), np.asarray(s2["tables"][v]))
        np.testing.assert_array_equal(np.asarray(s1["bytes_sent"][v]), np.asarray(s2["bytes_sent"][v]))
        np.testing.assert_array_equal(np.asarray(s1["taught"][v]), np.asarray(s2["taught"][v]))
    learnt = collective.learnt_after(w1, w1.rounds - 1)
    # each run chooses its gates on validation data: a threshold that flips between two near-identical students
    # moves a whole band of predictions, so the students are compared at the same (the vmapped run's) gates
    same_gates = {**s2, "gates": s1["gates"]}
    p1, p2 = collective.predictions(w1, s1, learnt), collective.predictions(w2, same_gates, learnt)
    for v in collective.VARIANTS:
        print(f"{v} gates: vmapped {np.asarray(s1['gates'][v]).tolist()}, sharded {np.asarray(s2['gates'][v]).tolist()}")
    np.testing.assert_array_equal(p1["alone"], p2["alone"])
    for rule in ("collective", "weights", "student"):
        differ = float(np.mean(p1[rule] != p2[rule]))
        assert differ <= 0.01, (rule, differ)
        print(f"{rule}: {100 * differ:.2f} % of predictions differ")
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
