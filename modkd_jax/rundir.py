"""Run directory = the run: config.json, metrics.jsonl, results.json, PNG plots, checkpoints.

Files are written atomically (temp file + rename) so an interrupted run never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


class RunDirError(RuntimeError):
    """The workdir holds something this run must not overwrite."""


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON values: arrays and tuples as lists, NumPy scalars as Python ones, NaN / inf as null."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON atomically (NaN becomes null).

    Args:
      path: the file to write (a ``.tmp`` sibling is written first, then renamed).
      data: any value ``jsonable`` turns into JSON (arrays, NumPy scalars, nested dicts and lists).
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def open_run(workdir: str | os.PathLike, config: dict) -> Path:
    """Create ``workdir`` with ``config.json``, or check that an existing run has the same config.

    Args:
      workdir: the run directory (created if missing; may already hold a ``checkpoints`` folder).
      config: the run's settings, written as ``config.json`` or compared key by key with the one there.

    Returns:
      ``workdir`` as a ``Path``.

    Raises:
      RunDirError: the folder holds another config, an unreadable config.json, or other files and no config.
    """
    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    config = jsonable(config)
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{cfg_path} is not valid JSON; use a fresh --workdir") from exc
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise RunDirError(f"{workdir} holds a run with a different config ({', '.join(diff)} differ); "
                              "use another --workdir or the same flags to resume")
        return workdir
    if workdir.exists() and any(p.name != "checkpoints" for p in workdir.iterdir()):
        raise RunDirError(f"{workdir} is not empty and holds no config.json; use an empty or new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(cfg_path, config)
    return workdir


def log_metrics(workdir: Path, record: dict) -> None:
    """Append one JSON line to ``metrics.jsonl``.

    Args:
      workdir: the run directory.
      record: the metrics of one step or phase (made ``jsonable``).
    """
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")


def truncate_metrics(workdir: Path, before_task: int) -> None:
    """Drop metric lines of tasks >= ``before_task`` (left by an interrupted run before resuming).

    Args:
      workdir: the run directory.
      before_task: the first task index to drop (records without a ``task`` key are kept).
    """
    filter_metrics(workdir, lambda rec: rec.get("task", -1) < before_task)


def filter_metrics(workdir: Path, keep_record) -> None:
    """Rewrite ``metrics.jsonl`` atomically with only the records ``keep_record(dict)`` accepts.

    Args:
      workdir: the run directory (nothing happens without a ``metrics.jsonl``).
      keep_record: a predicate on one parsed record; True keeps the line.
    """
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and keep_record(json.loads(line))]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def plot_matrices(path: str | os.PathLike, matrices: dict[str, np.ndarray], title: str = "") -> None:
    """Heatmaps of accuracy matrices R[i, j] (row: after task i, column: task j) side by side, as PNG.

    Args:
      path: the PNG file to write.
      matrices: ``{panel title: R}``, each R a ``[T, T]`` accuracy matrix in [0, 1] (NaN cells left blank).
      title: a heading over all panels ("" for none).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for ax, (name, R) in zip(axes[0], matrices.items()):
        R = np.asarray(R, float)
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i")
        if R.shape[0] <= 12:
            for (i, j), v in np.ndenumerate(R):
                if np.isfinite(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (temp file + rename) and close it.

    Args:
      fig: the matplotlib figure (closed afterwards).
      path: the image file to write.
      dpi: its resolution in dots per inch.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
