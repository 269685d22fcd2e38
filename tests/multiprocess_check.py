"""A baseline (EWC) on a 4-device mesh: 1 process x 4 devices, or 2 processes x 2 devices (run by a test).

MIND on 2 processes (every rule auto chooses among fitted across processes) is checked through its CLI by
``test_distributed``'s killed-and-resumed run (``multihost_run.py``).

Usage: ``python tests/multiprocess_check.py OUT.json single`` or ``... OUT.json PROCESS_ID PORT``.
Writes (process 0) the accuracy matrices and the largest batch each process handed to JAX.
"""

import json
import os
import sys
from pathlib import Path

multi = len(sys.argv) == 4
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if multi else 4}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modkd_jax import parallel  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1])
    if multi:
        parallel.maybe_initialize_distributed(True, f"127.0.0.1:{sys.argv[3]}", 2, int(sys.argv[2]))
    import jax
    import numpy as np

    from modkd_jax import data, loop
    from modkd_jax.methods import baselines

    fed = []  # rows this process hands to JAX per global batch
    real = jax.make_array_from_process_local_data

    def spy(sharding, local, global_shape=None):
        fed.append((np.shape(local)[0], (global_shape or np.shape(local))[0]))
        return real(sharding, local, global_shape)

    jax.make_array_from_process_local_data = spy
    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh(data=4)
    scenario = data.build("class_split", data.load("digits"), 2, seed=0, val_fraction=0.1)
    common = dict(arch="mlp", hidden=(32, 32), batch_size=32, optimizer="sgd", lr=0.05, crop_flip=False)
    learners = {"ewc": baselines.learner(baselines.BaselineConfig(method="ewc", **common, epochs=2, ewc_samples=64),
                                         scenario, mesh)}
    results = {name: {r: np.asarray(m).tolist() for r, m in loop.run(lrn, {"seed": 0}, None, echo=None)
                      ["accuracy_matrix"].items()} for name, lrn in learners.items()}
    record = {"results": results, "processes": jax.process_count(), "fed": sorted(set(fed))}
    if jax.process_index() == 0:
        out.write_text(json.dumps(record))
    print("OK", jax.process_index(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
