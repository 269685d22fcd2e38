"""Every method that supports a mesh: 4 CPU devices give the 1-device accuracy matrices (run by test_conformance).

MIND reports every task-inference rule (``report_rules="all"``), so each rule's statistics are fitted and
evaluated on the mesh too.

Run as its own process: the device count is fixed before JAX starts.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modkd_jax import data, loop, parallel  # noqa: E402
from modkd_jax.methods import baselines, mind  # noqa: E402
from modkd_jax.task_inference import RULES, InferenceConfig  # noqa: E402


def learners(mesh):
    scenario = data.build("class_split", data.load("digits"), 2, seed=0, val_fraction=0.1)
    common = dict(arch="mlp", hidden=(32, 32), batch_size=32, optimizer="sgd", lr=0.05, crop_flip=False)
    fixed = InferenceConfig(task_inference="max_prob")
    every = InferenceConfig(task_inference="auto", report_rules="all")  # every rule fitted and tested on the mesh
    for sd in (False, True):
        cfg = mind.MindConfig(**common, epochs=2, distill_epochs=2, distill_lr=0.05, temperature=2.0,
                              self_distillation=sd, policy="magnitude" if sd else "random",
                              inference=fixed if sd else every)
        yield cfg, mind.learner(cfg, scenario, mesh)
    for method in baselines.METHODS:
        cfg = baselines.BaselineConfig(method=method, **common, epochs=2, retrain_epochs=2, ewc_samples=64,
                                       inference=fixed)
        yield cfg, baselines.learner(cfg, scenario, mesh)


def main() -> int:
    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh(data=4)
    for (cfg, one), (_, four) in zip(learners(None), learners(mesh)):
        a = loop.run(one, {"seed": 0}, None, echo=None)["accuracy_matrix"]
        b = loop.run(four, {"seed": 0}, None, echo=None)["accuracy_matrix"]
        if cfg.inference.report_rules == "all":
            assert {f"cil_{r}" for r in RULES} <= set(a), sorted(a)
        for rule in a:  # gradients and batch statistics summed in another order: ~1e-7 on the weights
            np.testing.assert_allclose(b[rule], a[rule], atol=0.02, err_msg=f"{one.name} {rule}")
        worst = max(float(np.nanmax(np.abs(b[r] - a[r]))) for r in a)
        print(f"ok   {one.name}: 4 devices = 1 device (max |diff| {worst:.4f})", flush=True)
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
