"""DKT agents across processes: 4 agents on 1 process x 4 devices, or 2 processes x 2 devices (run by a test).

Usage: ``python tests/dkt_multiprocess_check.py OUT.json vmapped`` (1 process, agents vmapped on one
device), ``... OUT.json single`` (1 process x 4 devices) or ``... OUT.json PROCESS_ID PORT`` (one of 2
processes x 2 devices). Writes (process 0) the accuracy matrices and the bytes sent. With two processes the
``agents`` mesh axis spans both, so the ring's ``ppermute`` crosses processes; SGD, so every path gives the
same matrices (see dkt_sharded_check.py for Adam).
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
    from modkd_jax.methods import dkt

    assert jax.device_count() == 4, jax.devices()
    cfg = dkt.DKTConfig(agents=4, hidden=(32, 32), epochs=2, batch_size=32, probe_batch_size=16, n_probe=64,
                        lr=0.05, optimizer="sgd", eval_batch_size=360, exchange="probe")
    world = dkt.setup(cfg, data.load("digits"), 5, seed=0, agent_devices=1 if sys.argv[2] == "vmapped" else 4)
    res = loop.run(dkt.learner(world), {"seed": 0}, None, echo=None)
    record = {"R": {r: np.asarray(m).tolist() for r, m in res["accuracy_matrix"].items()},
              "bytes": res["exchange"]["bytes_sent_per_agent"], "processes": jax.process_count()}
    if jax.process_index() == 0:
        out.write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
