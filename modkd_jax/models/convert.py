"""ResNet-18 weights as ``.npz`` files: our Flax layout, and conversion from a torchvision state dict.

Our format (``save_npz`` / ``load_npz``): one array per leaf of the
``models.resnet18(num_outputs, num_tasks=1, stem="imagenet")`` variables,
named ``params/<path>`` and ``batch_stats/<path>`` with ``/`` between Flax
names, float32, e.g. ``params/stem/kernel`` (7, 7, 3, 64) HWIO,
``params/stage1_block0/bn_proj/scale`` (1, 128), ``batch_stats/bn_stem/mean``
(1, 64), ``params/classifier/kernel`` (512, K). The three 7x7 stems of
``resnet.STEMS`` ("imagenet", "no_pool", "stride1") share this tree; the split
backbone's per-task network t comes back to it with
``methods.split_backbone.backbone_of`` and goes out of it with ``build(init=...)``.

A torchvision ResNet-18 state dict saved as ``.npz`` (no torch needed to read it)::

    import numpy as np, torchvision
    sd = torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()
    np.savez("resnet18_tv.npz", **{k: v.numpy() for k, v in sd.items()})

converts with ``python -m modkd_jax.models.convert resnet18_tv.npz resnet18.npz``
(``load_any`` also accepts the torchvision file directly). Mapping: ``conv1`` ->
``stem``, ``bn1`` -> ``bn_stem``, ``layer{L}.{B}`` -> ``stage{L-1}_block{B}``
(``conv1/bn1/conv2/bn2``; ``downsample.0/1`` -> ``proj/bn_proj``), ``fc`` ->
``classifier``; conv weights OIHW -> HWIO, ``fc.weight`` transposed, BN
``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var`` with a
leading task axis of 1; ``num_batches_tracked`` is dropped. Both networks use
eps 1e-5 and the same paddings, so eval-mode outputs agree.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PyTree = Any
_BN_TV = {"weight": ("params", "scale"), "bias": ("params", "bias"),
          "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


class ConversionError(ValueError):
    """A weights file that is not a ResNet-18 in either supported layout."""


def _blocks() -> list[tuple[int, int, bool]]:
    """(torchvision layer 1..4, block 0..1, has projection) of ResNet-18's basic blocks."""
    return [(layer, b, layer > 1 and b == 0) for layer in range(1, 5) for b in range(2)]


def _pairs() -> list[tuple[str, str, str]]:
    """(torchvision module, our module, kind 'conv'|'bn'|'fc') for every ResNet-18 module."""
    pairs = [("conv1", "stem", "conv"), ("bn1", "bn_stem", "bn")]
    for layer, b, proj in _blocks():
        tv, ours = f"layer{layer}.{b}", f"stage{layer - 1}_block{b}"
        pairs += [(f"{tv}.conv1", f"{ours}/conv1", "conv"), (f"{tv}.bn1", f"{ours}/bn1", "bn"),
                  (f"{tv}.conv2", f"{ours}/conv2", "conv"), (f"{tv}.bn2", f"{ours}/bn2", "bn")]
        if proj:
            pairs += [(f"{tv}.downsample.0", f"{ours}/proj", "conv"), (f"{tv}.downsample.1", f"{ours}/bn_proj", "bn")]
    return pairs + [("fc", "classifier", "fc")]


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` from a nested dict of arrays."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out.update(flatten(v, name) if isinstance(v, Mapping) else {name: np.asarray(v)})
    return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """Nested dicts from ``{"a/b/c": array}``."""
    tree: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(v)
    return tree


def is_torchvision(keys) -> bool:
    """Whether the names are a torchvision ResNet state dict (``conv1.weight`` ...)."""
    return "conv1.weight" in set(keys)


def torchvision_to_flax(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(params, batch_stats)`` in our layout from a torchvision ResNet-18 state dict of arrays."""
    sd = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    flat: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    used = set()
    for tv, ours, kind in _pairs():
        if kind == "bn":
            names = {f"{tv}.{k}": v for k, v in _BN_TV.items()}
        else:
            names = {f"{tv}.weight": ("params", "kernel")}
            if kind == "fc":
                names[f"{tv}.bias"] = ("params", "bias")
        missing = [n for n in names if n not in sd]
        if missing:
            raise ConversionError(f"not a torchvision ResNet-18 state dict: {', '.join(missing[:3])} missing")
        for name, (col, leaf) in names.items():
            w = sd[name].astype(np.float32)
            if kind == "conv":
                if w.ndim != 4:
                    raise ConversionError(f"{name} has shape {w.shape}, expected a 4-d OIHW conv weight")
                w = w.transpose(2, 3, 1, 0)
            elif kind == "fc" and leaf == "kernel":
                w = w.T
            elif kind == "bn":
                w = w[None, :]
            flat[col][f"{ours}/{leaf}"] = w
            used.add(name)
    extra = sorted(set(sd) - used)
    if extra:
        raise ConversionError(f"not a torchvision ResNet-18 state dict: unexpected {', '.join(extra[:3])}")
    return unflatten(flat["params"]), unflatten(flat["batch_stats"])


def flax_to_torchvision(params: Mapping, batch_stats: Mapping) -> dict[str, np.ndarray]:
    """The inverse of ``torchvision_to_flax`` (``num_batches_tracked`` omitted)."""
    p, s = flatten(params), flatten(batch_stats)
    out = {}
    for tv, ours, kind in _pairs():
        if kind == "conv":
            out[f"{tv}.weight"] = p[f"{ours}/kernel"].transpose(3, 2, 0, 1)
        elif kind == "fc":
            out[f"{tv}.weight"], out[f"{tv}.bias"] = p[f"{ours}/kernel"].T, p[f"{ours}/bias"]
        else:
            for k, (col, leaf) in _BN_TV.items():
                out[f"{tv}.{k}"] = (p if col == "params" else s)[f"{ours}/{leaf}"][0]
    return out


def save_npz(path: str | os.PathLike, params: Mapping, batch_stats: Mapping) -> None:
    """Write ``(params, batch_stats)`` in our ``.npz`` format, atomically."""
    path = Path(path)
    arrays = {f"params/{k}": v for k, v in flatten(params).items()}
    arrays |= {f"batch_stats/{k}": v for k, v in flatten(batch_stats).items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file; a missing or unreadable file is a ConversionError."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path} as an .npz file ({type(exc).__name__}: {exc})") from exc


def load_npz(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(params, batch_stats)`` from a file in our ``.npz`` format."""
    arrays = _read(path)
    cols = {"params": {}, "batch_stats": {}}
    for name, v in arrays.items():
        col, _, rest = name.partition("/")
        if col not in cols or not rest:
            raise ConversionError(f"{path}: entry {name!r} is neither params/... nor batch_stats/...")
        cols[col][rest] = v
    return unflatten(cols["params"]), unflatten(cols["batch_stats"])


def load_any(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(params, batch_stats)`` from our ``.npz`` format or a torchvision ResNet-18 state dict ``.npz``."""
    arrays = _read(path)
    if is_torchvision(arrays):
        return torchvision_to_flax(arrays)
    return load_npz(path)


def main(argv: list[str] | None = None) -> int:
    """CLI: convert a torchvision ResNet-18 state dict ``.npz`` to our ``.npz`` format."""
    p = argparse.ArgumentParser(prog="python -m modkd_jax.models.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="torchvision ResNet-18 state dict saved with np.savez")
    p.add_argument("target", help="output .npz in modkd_jax's layout")
    args = p.parse_args(argv)
    try:
        arrays = _read(args.source)
        if not is_torchvision(arrays):
            raise ConversionError(f"{args.source} holds no conv1.weight; not a torchvision ResNet state dict")
        params, stats = torchvision_to_flax(arrays)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_npz(args.target, params, stats)
    n = sum(v.size for v in flatten(params).values())
    print(f"wrote {args.target}: {n / 1e6:.3f}M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
