"""Every task-inference rule at CIFAR-100 shape on ResNet-32 and ResNet-18: what each stores per task, and that
each runs end to end.

    python -m benchmarks.rule_memory              # writes benchmarks/results/rule_memory.md
    python -m benchmarks.rule_memory --archs resnet32

Per architecture: ``tfds.testing.mock_data`` CIFAR-100 (random images, ``--examples`` per split), a 10-task
class split with 10 % validation, MIND with the CIFAR-100 preset but 1 epoch per phase and
``--report_rules all`` (every rule's statistics fitted and every rule evaluated on the test splits), 2 tasks
through ``loop.run``. The table gives the bytes of statistics each rule keeps per task (float32; 0 for the
rules that read only the outputs), the task identification each rule reached after task 2 (meaningless on
random data: it shows the rule ran) and the run's seconds. The sub-network evaluator also keeps, per test split,
every task's logits and one score per rule in use: ``tasks x rows x (classes per task + rules)`` floats.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import common

RESULTS = Path(__file__).with_name("results") / "rule_memory.md"


def measure(arch: str, examples: int) -> dict:
    """Bytes per task of every rule and the final task identification of 2 tasks of MIND on mock CIFAR-100."""
    import tensorflow_datasets as tfds

    from modkd_jax import data, loop, models
    from modkd_jax.methods import mind
    from modkd_jax.task_inference import REGISTRY, RULES, InferenceConfig

    with tfds.testing.mock_data(num_examples=examples):
        ds = data.load("cifar100")
    sc = data.build("class_split", ds, 10, seed=0, val_fraction=0.1)
    cfg = mind.preset_config("cifar100", arch=arch, epochs=1, distill_epochs=1, batch_size=32, eval_batch_size=64,
                             inference=InferenceConfig(task_inference="auto", report_rules="all"))
    t0 = time.perf_counter()
    res = loop.run(mind.learner(cfg, sc), {"seed": 0}, None, echo=None, stop_after=2)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": res["task_inference"]["bytes_per_task"],
            "task_id": {r: res["accuracy_matrix"][REGISTRY[r].keys[1]][1][:2] for r in RULES},
            "params": res["params"]["student"],
            "features": models.feature_dim(mind.setup(cfg, sc).student, sc.input_shape)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet32", "resnet18"])
    ap.add_argument("--examples", type=int, default=1000,
                    help="mock examples per split (about 10 per class, so each class keeps one for validation)")
    args = ap.parse_args(argv)
    from modkd_jax.task_inference import RULES

    runs = {arch: measure(arch, args.examples) for arch in args.archs}
    head = ["rule"] + [f"{a} bytes/task" for a in args.archs] + [f"{a} task id (tasks 1, 2)" for a in args.archs]
    lines = [f"$ python -m benchmarks.rule_memory --archs {' '.join(args.archs)} --examples {args.examples}",
             common.banner(), "",
             "; ".join(f"{a}: {r['params']:,} parameters, {r['features']} features, 2 tasks in {r['seconds']:.0f} s"
                       for a, r in runs.items()), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in RULES:
        size = [f"{runs[a]['bytes'][rule] / 1e6:.2f} MB" if runs[a]["bytes"][rule] else "0" for a in args.archs]
        tid = [", ".join("-" if v is None else f"{v:.2f}" for v in runs[a]["task_id"][rule]) for a in args.archs]
        lines.append("| " + " | ".join([rule, *size, *tid]) + " |")
    lines += ["", "(mock data: random images and labels; the task identification only shows that every rule ran)",
              common.load(), ""]
    common.publish(lines, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
