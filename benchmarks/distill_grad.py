"""How much MIND's distillation term pulls against cross-entropy: ||grad beta*L_SD|| / ||grad CE|| on one batch.

    python -m benchmarks.distill_grad --dataset mnist --data_dir ../shared/data/mnist

Split MNIST, task 0, MIND's defaults for the dataset: a dense teacher is trained
as ``methods.mind`` trains it; then, on one fixed batch of the task's training
split, the gradients of ``CE`` and of ``beta * L`` with respect to the
student's trainable weights (sub-network 0) are compared for every
distillation loss and temperature below, at the start of distillation and
after one epoch of it (trained with the paper's loss). The first row is the
term the code used before the fidelity fix (true Jensen-Shannon at the
inference temperature 6.5); the second is the paper's L_SD at T = 1.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import banner


def _contenders():
    """``(label, term(student_logits, teacher_logits))``; the first is the pre-fix code (JS at 6.5, no T^2)."""
    from modkd_jax import losses

    return (("before: Jensen-Shannon at tau = 6.5", lambda s, t: losses.js_divergence(t, s, 6.5)),
            ("paper: L_SD (symmetric KL) at T = 1", lambda s, t: losses.distillation("symkl", s, t, 1.0)),
            ("Jensen-Shannon at T = 1", lambda s, t: losses.distillation("js", s, t, 1.0)),
            ("Hinton KD at T = 1", lambda s, t: losses.distillation("kd", s, t, 1.0)),
            ("L_SD at T = 2 (x T^2)", lambda s, t: losses.distillation("symkl", s, t, 2.0)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_grad", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist", "digits"))
    p.add_argument("--data_dir", default=None)
    p.add_argument("--epochs", type=int, default=None, help="teacher epochs (default: MIND's for the dataset)")
    p.add_argument("--batch_size", type=int, default=128, help="examples in the fixed batch")
    p.add_argument("--seed", type=int, default=0)
    return p


def grad_norms(m, state, owner, teacher_vars, x, y, term_fn):
    """(||grad CE||, ||grad beta * L||, L) over sub-network 0's trainable weights on (x, y)."""
    from modkd_jax import losses, masks
    from modkd_jax.data import batching

    fwd, trn = masks.forward_mask(owner, 0), masks.trainable_mask(owner, 0)
    xf = batching.to_float(x, *m.scenario.norm)
    z_t = m.teacher.apply(teacher_vars, xf, 0, train=False)

    def logits(p):
        z, _ = m.student.apply({"params": masks.gate(p, fwd), "batch_stats": state["batch_stats"]}, xf, 0, train=True,
                               mutable=["batch_stats"])
        return z[:, :m.block_size]

    def norm(g):
        return float(jnp.sqrt(sum(jnp.sum(jnp.where(t, v, 0.0) ** 2) for v, t in
                                  zip(jax.tree.leaves(g), jax.tree.leaves(trn)))))

    g_ce = jax.grad(lambda p: losses.cross_entropy(logits(p), y))(state["params"])
    term = lambda p: m.cfg.beta * term_fn(logits(p), jax.lax.stop_gradient(z_t))  # noqa: E731
    value, g_sd = jax.value_and_grad(term)(state["params"])
    return norm(g_ce), norm(g_sd), float(value) / m.cfg.beta


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from experiments import mind as cli
    from experiments.common import build_scenario
    from modkd_jax import masks, models, training
    from modkd_jax.methods import mind

    cfg = cli.resolve_config(cli.parser().parse_args(
        ["--dataset", args.dataset, "--task_count", "5", "--seed", str(args.seed)]
        + (["--epochs", str(args.epochs)] if args.epochs else [])))
    scenario = build_scenario(cfg, data_dir=args.data_dir)
    m = mind.setup(cli.mind_config(cfg), scenario)
    c, task = m.cfg, scenario.tasks[0]
    print(banner())
    key = jax.random.key(args.seed)
    t_params, t_bs = models.init(m.teacher, jax.random.fold_in(key, 1), scenario.input_shape)
    full = masks.full_mask(t_params)
    carry = training.run_phase(m.steps["teacher"], (t_params, t_bs, m.txs["teacher"].init(t_params)), task.train,
                               mind.Context(jnp.int32(0), full, full),
                               training.Phase(c.epochs, c.batch_size, c.lr, c.lr_milestones),
                               jax.random.fold_in(key, 2), progress=False)
    teacher_vars = {"params": carry[0], "batch_stats": carry[1]}
    state = mind.init_state(m, jax.random.fold_in(key, 3))
    owner = masks.assign(state["owner"], m.kinds, 0, m.task_count, key=jax.random.fold_in(key, 4))
    x, y = task.train.x[:args.batch_size], task.train.y[:args.batch_size]
    print(f"{scenario.name}, task 0 {task.classes}: teacher {c.epochs} epoch(s); fixed batch of {len(y)} training "
          f"examples; beta {c.beta}; norms over sub-network 0's trainable weights")
    print("\n| distillation term | when | L | ||grad CE|| | ||grad beta*L|| | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    ratios, contenders = {}, _contenders()
    for when in ("start of distillation", "after 1 distillation epoch"):
        for label, term_fn in contenders:
            g_ce, g_sd, value = grad_norms(m, state, owner, teacher_vars, x, y, term_fn)
            ratios[(when, label)] = g_sd / g_ce
            print(f"| {label} | {when} | {value:.4f} | {g_ce:.4f} | {g_sd:.4f} | {g_sd / g_ce:.3f} |")
        if when.startswith("start"):  # one epoch of the paper's distillation, as methods.mind runs it
            carry = (state["params"], state["batch_stats"], m.txs["distill"].init(state["params"]))
            ctx = mind.Context(jnp.int32(0), masks.forward_mask(owner, 0), masks.trainable_mask(owner, 0),
                               teacher_vars)
            params, bs, _ = training.run_phase(
                m.steps["distill"], carry, task.train, ctx,
                training.Phase(1, c.batch_size, c.distill_lr, drop_last=c.drop_last),
                jax.random.fold_in(key, 5), progress=False)
            state = {**state, "params": params, "batch_stats": bs}
    for when in ("start of distillation", "after 1 distillation epoch"):
        before, paper = ratios[(when, contenders[0][0])], ratios[(when, contenders[1][0])]
        print(f"{when}: gradient norm ratio to CE {before:.4f} before -> {paper:.3f} with the paper's term "
              f"({paper / before:.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
