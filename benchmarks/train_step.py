"""Images/s of MIND's gated ResNet-32 teacher and distillation steps in JAX vs. the same steps in PyTorch.

    python -m benchmarks.train_step                       # batch 256, 10 tasks of 10 classes
    python -m benchmarks.train_step --variants xla:nomat,xla,bf16,patches --steps 2 --rounds 3

The JAX steps are the library's own (``training.make_step`` on
``methods.mind.make_loss`` as ``methods.mind`` builds them: crop+flip, gated forward, Adam through
``optim.gated``; the distillation step runs the dense teacher and the student
sub-network of task 4 with CE + beta * L_SD, the paper's symmetric KL at T = 1). The PyTorch steps are written here to
match: gated convs as ``weight * mask`` with the same masks, per-task batch
norm, the same augmentation, loss and optimizer (Adam, lr as MIND), NCHW
float32, eager mode. Inputs are random uint8 images (speed only).

JAX variants (``--variants``): ``xla`` is the model as built by default;
``xla:nomat`` the same without ``materialize`` (the model before the CPU work);
``bf16`` convolutions on bfloat16 operands with float32 accumulation;
``patches`` convolutions as im2col + one matmul. Contenders are timed
round-robin in one run (``benchmarks.common.interleaved``) and the ratios are
to PyTorch measured in the same run. Achieved GFLOP/s use XLA's FLOP count of
the compiled step and are compared with a measured float32 matmul rate.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from modkd_jax import masks, models, training
from modkd_jax.methods import mind
from modkd_jax.models import resnet

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
VARIANTS = {  # name -> ResNet keyword arguments
    "xla": {"conv_impl": "xla"},
    "xla:nomat": {"conv_impl": "xla", "materialize": False},
    "bf16": {"conv_impl": "bf16"},
    "patches": {"conv_impl": "patches"},
}
STUDENT_TASK = 4  # the distillation step trains sub-network 4: tasks 0..4 own weights, 5.. are free


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=2, help="round-robin timing rounds (median reported)")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--classes", type=int, default=10, help="classes per task block")
    p.add_argument("--variants", default="xla:nomat,xla", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--no_torch", action="store_true", help="JAX figures only")
    return p


# ----------------------------------------------------------------------------- JAX


def jax_contenders(variant: str, args, x_u8: np.ndarray, y: np.ndarray):
    """(teacher step, distill step, FLOPs of each) for one model variant; the callables run one step."""
    kw = VARIANTS[variant]
    T, k = args.tasks, args.classes
    student = resnet.resnet32(k * T, T, **kw)
    teacher = resnet.resnet32(k, 1, **kw)
    aug = dict(mean=CIFAR_MEAN, std=CIFAR_STD, crop_flip=True)
    tx_t = training.make_optimizer("adam", 0.005)
    tx_d = training.make_optimizer("adam", 0.035)
    teacher_step = training.make_step(mind.make_loss(teacher.apply, k), tx_t, training.augmenting(**aug))
    distill_step = training.make_step(
        mind.make_loss(student.apply, k, "symkl", beta=5.0, temperature=1.0), tx_d,
        training.augmenting(**aug, teacher=lambda ctx, x: teacher.apply(ctx.teacher, x, 0, train=False)))

    t_params, t_bs = models.init(teacher, jax.random.key(1), (32, 32, 3))
    s_params, s_bs = models.init(student, jax.random.key(2), (32, 32, 3))
    owner = student_owner(s_params, T, k)
    full = masks.full_mask(t_params)
    fwd, trn = masks.forward_mask(owner, STUDENT_TASK), masks.trainable_mask(owner, STUDENT_TASK)
    xs, ys = jnp.asarray(x_u8), jnp.asarray(y)
    batch = training.Batch(xs, ys)
    teacher_vars = {"params": t_params, "batch_stats": t_bs}  # the distillation teacher (never donated)
    ctx_t = mind.Context(jnp.int32(0), full, full)
    ctx_d = mind.Context(jnp.int32(STUDENT_TASK), fwd, trn, teacher_vars)
    state = {"t": (jax.tree.map(jnp.copy, t_params), jax.tree.map(jnp.copy, t_bs), tx_t.init(t_params)),
             "d": (s_params, s_bs, tx_d.init(s_params)), "i": 0}

    flops_t = common.cost_flops(teacher_step, state["t"], batch, jax.random.key(0), ctx_t)
    flops_d = common.cost_flops(distill_step, state["d"], batch, jax.random.key(0), ctx_d)

    def run_teacher():
        state["i"] += 1
        state["t"], m = teacher_step(state["t"], batch, jax.random.key(state["i"]), ctx_t)
        return m["loss"]

    def run_distill():
        state["i"] += 1
        state["d"], m = distill_step(state["d"], batch, jax.random.key(state["i"]), ctx_d)
        return m["loss"]

    return run_teacher, run_distill, flops_t, flops_d, owner


def student_owner(params, tasks: int, k: int):
    """Owner maps with tasks 0..STUDENT_TASK assigned (random policy), as after STUDENT_TASK+1 MIND tasks."""
    kinds = models.leaf_kinds(params)
    owner = masks.init_owners(params, kinds, (k,) * tasks)
    for t in range(STUDENT_TASK + 1):
        owner = masks.assign(owner, kinds, t, tasks, key=jax.random.key(100 + t))
    return owner


# ----------------------------------------------------------------------------- PyTorch


def torch_contenders(args, x_u8: np.ndarray, y: np.ndarray, owner):
    """(teacher step, distill step) written in PyTorch to match the JAX steps; None if torch is missing."""
    try:
        import torch
        import torch.nn as tnn
        import torch.nn.functional as F
    except ImportError:
        return None
    T, k = args.tasks, args.classes
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    class GatedConv(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.weight = tnn.Parameter(torch.randn(cout, cin, 3, 3) * math.sqrt(2.0 / (9 * cout)))
            self.register_buffer("mask", torch.ones_like(self.weight))
            self.stride = stride

        def forward(self, x):
            return F.conv2d(x, self.weight * self.mask, stride=self.stride, padding=1)

    class TaskBN(tnn.Module):  # one BatchNorm2d per task, as TaskBatchNorm
        def __init__(self, c, tasks):
            super().__init__()
            self.bns = tnn.ModuleList(tnn.BatchNorm2d(c) for _ in range(tasks))

        def forward(self, x, t):
            return self.bns[t](x)

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride, tasks):
            super().__init__()
            self.conv1, self.bn1 = GatedConv(cin, cout, stride), TaskBN(cout, tasks)
            self.conv2, self.bn2 = GatedConv(cout, cout, 1), TaskBN(cout, tasks)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x, t):
            y = F.relu(self.bn1(self.conv1(x), t))
            y = self.bn2(self.conv2(y), t)
            if self.extra or self.stride != 1:  # option A shortcut, as resnet.BasicBlock
                x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2,
                                                                   self.extra - self.extra // 2))
            return F.relu(x + y)

    class ResNet32(tnn.Module):
        def __init__(self, outputs, tasks):
            super().__init__()
            self.stem, self.bn = GatedConv(3, 16, 1), TaskBN(16, tasks)
            blocks, cin = [], 16
            for s, w in enumerate((16, 32, 64)):
                for b in range(5):
                    blocks.append(Block(cin, w, 2 if (b == 0 and s > 0) else 1, tasks))
                    cin = w
            self.blocks = tnn.ModuleList(blocks)
            self.fc = tnn.Linear(64, outputs)
            self.register_buffer("fc_mask", torch.ones_like(self.fc.weight))

        def forward(self, x, t=0):
            x = F.relu(self.bn(self.stem(x), t))
            for blk in self.blocks:
                x = blk(x, t)
            return F.linear(x.mean((2, 3)), self.fc.weight * self.fc_mask, self.fc.bias)

    def augment(x):  # uint8 NHWC -> random crop (pad 4) + flip, standardised float NCHW
        n, h, w, _ = x.shape
        xp = F.pad(x.permute(0, 3, 1, 2).float(), (4, 4, 4, 4))
        rows = torch.randint(0, 9, (n, 1)) + torch.arange(h)
        cols = torch.randint(0, 9, (n, 1)) + torch.arange(w)
        cols = torch.where(torch.rand(n, 1) < 0.5, cols.flip(1), cols)
        out = xp[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return (out / 255.0 - mean) / std

    def symkl(p_logits, q_logits):
        lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
        return (0.5 * ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1)).mean()  # 1/2 [KL(p||q) + KL(q||p)]

    # Student masks from the same owner maps as the JAX student (HWIO -> OIHW; classifier (in, out) -> (out, in)).
    fwd_np = jax.tree.map(np.array, masks.forward_mask(owner, STUDENT_TASK))
    trn_np = jax.tree.map(np.array, masks.trainable_mask(owner, STUDENT_TASK))
    teacher, student = ResNet32(k, 1), ResNet32(k * T, T)
    teacher.eval()
    trn_masks = {}
    for name, mod in [("stem", student.stem)] + [
            (f"stage{i // 5}_block{i % 5}/conv{j}", getattr(student.blocks[i], f"conv{j}"))
            for i in range(15) for j in (1, 2)]:
        path = name.split("/")
        f, m = fwd_np, trn_np
        for part in path:
            f, m = f[part], m[part]
        mod.mask.copy_(torch.from_numpy(np.ascontiguousarray(f["kernel"].transpose(3, 2, 0, 1))).float())
        trn_masks[mod.weight] = torch.from_numpy(np.ascontiguousarray(m["kernel"].transpose(3, 2, 0, 1))).float()
    student.fc_mask.copy_(torch.from_numpy(np.ascontiguousarray(fwd_np["classifier"]["kernel"].T)).float())
    trn_masks[student.fc.weight] = torch.from_numpy(np.ascontiguousarray(trn_np["classifier"]["kernel"].T)).float()
    trn_masks[student.fc.bias] = torch.from_numpy(trn_np["classifier"]["bias"]).float()

    xt, yt = torch.from_numpy(x_u8), torch.from_numpy(y.astype(np.int64))
    opt_d = torch.optim.Adam(student.parameters(), lr=0.035)
    trainer = ResNet32(k, 1)  # the teacher being trained (the frozen `teacher` above only feeds distillation)
    opt_t = torch.optim.Adam(trainer.parameters(), lr=0.005)
    t = STUDENT_TASK

    def run_teacher():
        loss = F.cross_entropy(trainer(augment(xt)), yt)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()

    def run_distill():
        x = augment(xt)
        with torch.no_grad():
            t_logits = teacher(x)
        z = student(x, t)[:, t * k:(t + 1) * k]
        loss = F.cross_entropy(z, yt) + 5.0 * symkl(t_logits, z)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in trn_masks.items():  # only task t's weights learn (optim.gated); other tasks' BNs get no grad
            p.grad.mul_(m)
        opt_d.step()

    return run_teacher, run_distill, f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: unknown variant(s) {unknown}; expected some of {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    if min(args.batch_size, args.steps, args.rounds, args.tasks, args.classes) < 1 or args.tasks <= STUDENT_TASK:
        print(f"error: sizes must be positive and --tasks > {STUDENT_TASK}", file=sys.stderr)
        return 2
    B = args.batch_size
    print(common.banner())
    print(f"gated ResNet-32, batch {B}, {args.tasks} tasks x {args.classes} classes; "
          f"{args.rounds} rounds x {args.steps} steps per contender, medians; shared machine: compare ratios")
    rate32 = common.matmul_rate(2048, jnp.float32)
    rate16 = common.matmul_rate(2048, jnp.bfloat16)
    print(f"measured matmul rate (2048^3): float32 {rate32:.0f} GFLOP/s, bfloat16 -> float32 {rate16:.0f} GFLOP/s")

    rng = np.random.default_rng(0)
    x_u8 = rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, args.classes, (B,)).astype(np.int32)
    contenders, flops, owner = {}, {}, None
    for v in variants:
        run_t, run_d, f_t, f_d, owner = jax_contenders(v, args, x_u8, y)
        contenders[f"jax {v} | teacher"], contenders[f"jax {v} | distill"] = run_t, run_d
        flops[f"jax {v} | teacher"], flops[f"jax {v} | distill"] = f_t, f_d
    torch_side = None if args.no_torch else torch_contenders(args, x_u8, y, owner)
    if torch_side is None and not args.no_torch:
        print("PyTorch is not installed (pip install torch==2.13.0, or .[bench]): JAX figures only")
    if torch_side is not None:
        contenders["torch | teacher"], contenders["torch | distill"], torch_name = torch_side
        print(f"PyTorch: {torch_name}, eager, NCHW float32")

    secs = common.interleaved(contenders, rounds=args.rounds, calls=args.steps)
    rows = []
    for name, s in secs.items():
        phase = name.split("| ")[1]
        ref = flops.get(name) if not name.startswith("torch") else next(
            (flops[f"jax {v} | {phase}"] for v in ("xla", "xla:nomat", *variants) if f"jax {v} | {phase}" in flops), None)
        torch_s = secs.get(f"torch | {phase}")
        rows.append({
            "contender": name, "s/step": f"{s:.3f}", "images/s": f"{B / s:.1f}",
            "vs torch": "-" if torch_s is None else f"{torch_s / s:.2f}x",
            "GFLOP/step": "-" if ref is None else f"{ref / 1e9:.1f}",
            "GFLOP/s": "-" if ref is None else f"{ref / s / 1e9:.1f}",
            "of f32 matmul": "-" if ref is None else f"{100 * ref / s / 1e9 / rate32:.0f}%",
        })
    print(common.table(rows, ["contender", "s/step", "images/s", "vs torch", "GFLOP/step", "GFLOP/s",
                              "of f32 matmul"]))
    if torch_side is not None:
        for phase in ("teacher", "distill"):
            ratios = ", ".join(f"{v} {secs[f'torch | {phase}'] / secs[f'jax {v} | {phase}']:.2f}"
                               for v in variants)
            print(f"JAX/PyTorch throughput ratio, {phase} step: {ratios}")
    print(f"after timing: {common.load()}")
    if "xla:nomat" in variants and "xla" in variants:
        for phase in ("teacher", "distill"):
            print(f"materialize speed-up, {phase} step: "
                  f"{secs[f'jax xla:nomat | {phase}'] / secs[f'jax xla | {phase}']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
