"""Continual-learning scenarios: a dataset (or several) cut into a sequence of tasks.

Every task carries train / val / test splits. The validation split is held out
from the task's *training* data (stratified per class, drawn from the seed);
test data is never touched. Labels are task-local (``0..len(classes)-1``), with
the original labels kept in ``y_global``. A scenario lays the tasks' class
blocks side by side in one output layer: task ``t`` owns rows
``offsets[t] : offsets[t] + block_sizes[t]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from modkd_jax.data.sources import Dataset, normalization

SCENARIOS = ("class_split", "permuted", "rotated", "dataset_sequence")
_CHUNK = 8192  # images per chunk for host-side geometric transforms (bounded float32 memory)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one task: uint8 NHWC images, task-local and original int32 labels."""

    x: np.ndarray
    y: np.ndarray
    y_global: np.ndarray

    def __len__(self) -> int:
        """Number of examples, so splits can be sized like arrays."""
        return int(self.y.shape[0])


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its original class labels (local label i <-> classes[i]) and its splits."""

    id: int
    classes: np.ndarray
    train: Split
    val: Split
    test: Split
    name: str


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A named task sequence with the shared input shape and per-channel normalisation."""

    name: str
    tasks: tuple[Task, ...]
    input_shape: tuple[int, int, int]
    norm: tuple[np.ndarray, np.ndarray]

    @property
    def task_count(self) -> int:
        """Number of tasks in the sequence."""
        return len(self.tasks)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Number of classes of each task, i.e. the height of its block of output rows."""
        return tuple(int(len(t.classes)) for t in self.tasks)

    @property
    def num_outputs(self) -> int:
        """Total output rows when every task's class block gets its own rows."""
        return int(sum(self.block_sizes))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start row of each task's class block in the joint output layer."""
        return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.block_sizes)[:-1]]))


def _task_rng(seed: int, task_id: int, stream: int) -> np.random.Generator:
    """Independent, reproducible random stream per (seed, task, purpose)."""
    return np.random.default_rng([seed, task_id, stream])


def _check_val_fraction(val_fraction: float) -> None:
    """Reject validation fractions outside [0, 1) with one sentence."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _check_task_count(task_count: int, limit: int | None = None) -> None:
    """Reject task counts below 1 (or above `limit`) with one sentence."""
    if not isinstance(task_count, (int, np.integer)) or task_count < 1:
        raise ValueError(f"task_count must be a positive integer, got {task_count!r}")
    if limit is not None and task_count > limit:
        raise ValueError(f"task_count {task_count} exceeds the {limit} classes available")


def stratified_holdout(
    y: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..len(y)-1 into sorted (train, val) with round(val_fraction*n_c) per class.

    Args:
      y: the labels, one per position.
      val_fraction: the share of each class held out for validation.
      rng: draws which members of each class are held out.
    """
    val_parts = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_val = int(round(val_fraction * len(members)))
        val_parts.append(rng.permutation(members)[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(y)), val, assume_unique=True)
    return train, val


def _split(x: np.ndarray, y_global: np.ndarray, lut: np.ndarray) -> Split:
    """Make a Split from images and original labels, mapping labels through `lut` to local ones."""
    y_global = np.asarray(y_global, np.int32)
    return Split(x=x, y=lut[y_global].astype(np.int32), y_global=y_global)


def _make_task(
    task_id: int,
    classes: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    name: str,
    seed: int,
    val_fraction: float,
    num_classes: int,
) -> Task:
    """Assemble a task from its (x, y_global) train and test data, holding val out of train."""
    classes = np.asarray(classes, np.int32)
    lut = np.full(num_classes, -1, np.int32)
    lut[classes] = np.arange(len(classes), dtype=np.int32)
    (tx, ty), (ex, ey) = train, test
    keep, held = stratified_holdout(ty, val_fraction, _task_rng(seed, task_id, 0))
    return Task(
        id=task_id,
        classes=classes,
        train=_split(tx[keep], ty[keep], lut),
        val=_split(tx[held], ty[held], lut),
        test=_split(ex, ey, lut),
        name=name,
    )


def _norm(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Normalisation of a dataset known to `sources`, else computed from its training images."""
    try:
        return normalization(ds.name)
    except ValueError:
        pixels = ds.train_x.reshape(-1, ds.train_x.shape[-1]).astype(np.float64) / 255.0
        return pixels.mean(0).astype(np.float32), pixels.std(0).astype(np.float32)


def class_split(
    ds: Dataset, task_count: int, seed: int = 0, val_fraction: float = 0.1, shuffle_classes: bool = True
) -> Scenario:
    """Class-incremental split: the classes, in an order drawn from `seed`, cut into equal tasks.

    Args:
      ds: the dataset.
      task_count: the number of tasks; it must divide the dataset's classes.
      seed: the seed of the class order and of the validation holdout.
      val_fraction: the share of each class's training data held out for validation, in [0, 1).
      shuffle_classes: draw the class order; False keeps ``0, 1, ...``.
    """
    _check_task_count(task_count, ds.num_classes)
    _check_val_fraction(val_fraction)
    if ds.num_classes % task_count:
        raise ValueError(f"task_count {task_count} does not divide the {ds.num_classes} classes of {ds.name}")
    k = ds.num_classes // task_count
    order = np.random.default_rng(seed).permutation(ds.num_classes) if shuffle_classes else np.arange(ds.num_classes)
    tasks = []
    for t in range(task_count):
        classes = order[t * k : (t + 1) * k]
        tr = np.isin(ds.train_y, classes)
        te = np.isin(ds.test_y, classes)
        name = f"{ds.name}[{','.join(str(int(c)) for c in classes)}]"
        tasks.append(
            _make_task(
                t, classes, (ds.train_x[tr], ds.train_y[tr]), (ds.test_x[te], ds.test_y[te]),
                name, seed, val_fraction, ds.num_classes,
            )
        )
    return Scenario(f"{ds.name}-class_split-{task_count}", tuple(tasks), ds.image_shape, _norm(ds))


def pixel_permutations(shape: tuple[int, int, int], task_count: int, seed: int) -> list[np.ndarray]:
    """One fixed permutation of the H*W pixel positions per task, reproducible from `seed`.

    Args:
      shape: the images' ``(H, W, C)``.
      task_count: the number of permutations.
      seed: the seed they are drawn from (with each task id).
    """
    h, w, _ = shape
    return [_task_rng(seed, t, 1).permutation(h * w) for t in range(task_count)]


def permute_pixels(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Reorder the H*W pixel positions of NHWC images by `perm` (all channels alike).

    Args:
      x: images ``[N, H, W, C]``.
      perm: a permutation of ``range(H * W)`` (``pixel_permutations``).
    """
    n, h, w, c = x.shape
    return x.reshape(n, h * w, c)[:, perm, :].reshape(n, h, w, c)


def permuted(ds: Dataset, task_count: int, seed: int = 0, val_fraction: float = 0.1) -> Scenario:
    """Permuted-pixel domain-incremental tasks with all classes each.

    Args:
      ds: the dataset.
      task_count: the number of tasks. Every task, task 0 included, uses its own pixel permutation drawn from
        (seed, task id); none is the identity on purpose.
      seed: the seed of the permutations and of the validation holdout.
      val_fraction: the share of each class's training data held out for validation, in [0, 1).
    """
    _check_task_count(task_count)
    _check_val_fraction(val_fraction)
    classes = np.arange(ds.num_classes)
    tasks = []
    for t, perm in enumerate(pixel_permutations(ds.image_shape, task_count, seed)):
        tasks.append(
            _make_task(
                t, classes,
                (permute_pixels(ds.train_x, perm), ds.train_y),
                (permute_pixels(ds.test_x, perm), ds.test_y),
                f"permuted_{ds.name}#{t}", seed, val_fraction, ds.num_classes,
            )
        )
    return Scenario(f"{ds.name}-permuted-{task_count}", tuple(tasks), ds.image_shape, _norm(ds))


def rotate_images(x: np.ndarray, angle: float) -> np.ndarray:
    """Rotate uint8 NHWC images by `angle` degrees about their centre (bilinear, zero fill).

    Args:
      x: uint8 images ``[N, H, W, C]``.
      angle: degrees, counter-clockwise (a multiple of 360 returns a copy).
    """
    if float(angle) % 360.0 == 0.0:
        return x.copy()
    from scipy import ndimage

    out = np.empty_like(x)
    for start in range(0, len(x), _CHUNK):
        chunk = x[start : start + _CHUNK].astype(np.float32)
        turned = ndimage.rotate(chunk, angle, axes=(1, 2), reshape=False, order=1, mode="constant", cval=0.0)
        out[start : start + _CHUNK] = np.clip(np.rint(turned), 0, 255).astype(np.uint8)
    return out


def rotation_angles(task_count: int, max_angle: float = 180.0) -> np.ndarray:
    """Task angles evenly spaced in [0, max_angle): task 0 is unrotated.

    Args:
      task_count: the number of tasks.
      max_angle: the end of the range in degrees (excluded).
    """
    return np.linspace(0.0, max_angle, task_count, endpoint=False)


def rotated(
    ds: Dataset, task_count: int, seed: int = 0, val_fraction: float = 0.1, max_angle: float = 180.0
) -> Scenario:
    """Rotated domain-incremental tasks with all classes each; task t turned by rotation_angles[t].

    Args:
      ds: the dataset.
      task_count: the number of tasks.
      seed: the seed of the validation holdout.
      val_fraction: the share of each class's training data held out for validation, in [0, 1).
      max_angle: the angles are spaced over [0, max_angle) degrees.
    """
    _check_task_count(task_count)
    _check_val_fraction(val_fraction)
    classes = np.arange(ds.num_classes)
    tasks = []
    for t, angle in enumerate(rotation_angles(task_count, max_angle)):
        tasks.append(
            _make_task(
                t, classes,
                (rotate_images(ds.train_x, angle), ds.train_y),
                (rotate_images(ds.test_x, angle), ds.test_y),
                f"rotated_{ds.name}@{angle:g}", seed, val_fraction, ds.num_classes,
            )
        )
    return Scenario(f"{ds.name}-rotated-{task_count}", tuple(tasks), ds.image_shape, _norm(ds))


def resize_images(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize uint8 NHWC images to `shape` (H, W, C): bilinear, gray->RGB replicated, RGB->gray luma.

    Args:
      x: uint8 images ``[N, H, W, C]`` with 1 or 3 channels.
      shape: the target ``(H, W, C)``.
    """
    n, h, w, c = x.shape
    th, tw, tc = shape
    if c != tc and not (c == 1 and tc == 3) and not (c == 3 and tc == 1):
        raise ValueError(f"cannot convert {c}-channel images to {tc} channels")
    if (h, w) != (th, tw):
        import jax

        out = np.empty((n, th, tw, c), np.uint8)
        for start in range(0, n, _CHUNK):
            chunk = x[start : start + _CHUNK].astype(np.float32)
            big = jax.image.resize(chunk, (len(chunk), th, tw, c), method="linear")
            out[start : start + _CHUNK] = np.clip(np.rint(np.asarray(big)), 0, 255).astype(np.uint8)
        x = out
    if c == 1 and tc == 3:
        x = np.repeat(x, 3, axis=-1)
    elif c == 3 and tc == 1:
        luma = x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        x = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    return x


def dataset_sequence(
    datasets: Sequence[Dataset], shape: tuple[int, int, int] = (32, 32, 3), seed: int = 0, val_fraction: float = 0.1
) -> Scenario:
    """One task per dataset (all its classes), images resized to `shape`.

    Normalisation rule: mean = std = 0.5 per channel, i.e. inputs in [-1, 1],
    since no single dataset's statistics fit the mixture.

    Args:
      datasets: the datasets, in task order (at least one).
      shape: every task's image shape ``(H, W, C)``.
      seed: the seed of the validation holdout.
      val_fraction: the share of each class's training data held out for validation, in [0, 1).
    """
    if not datasets:
        raise ValueError("dataset_sequence needs at least one dataset")
    _check_val_fraction(val_fraction)
    shape = tuple(int(s) for s in shape)
    tasks = []
    for t, ds in enumerate(datasets):
        tasks.append(
            _make_task(
                t, np.arange(ds.num_classes),
                (resize_images(ds.train_x, shape), ds.train_y),
                (resize_images(ds.test_x, shape), ds.test_y),
                ds.name, seed, val_fraction, ds.num_classes,
            )
        )
    half = np.full(shape[-1], 0.5, np.float32)
    name = "+".join(ds.name for ds in datasets)
    return Scenario(f"{name}-sequence", tuple(tasks), shape, (half, half.copy()))


def merged_stream(
    scenario: Scenario, batch_size: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One pass over all tasks' training examples pooled and shuffled: (x, y_local, task_id) batches.

    Args:
      scenario: the scenario whose training splits are pooled.
      batch_size: examples per batch (the last may be smaller).
      seed: the seed of the shuffle.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sizes = [len(t.train) for t in scenario.tasks]
    task_of = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
    index_of = np.concatenate([np.arange(s) for s in sizes]) if sizes else np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(len(task_of))
    for start in range(0, len(order), batch_size):
        pick = order[start : start + batch_size]
        tids, idx = task_of[pick], index_of[pick]
        x = np.empty((len(pick), *scenario.input_shape), np.uint8)
        y = np.empty(len(pick), np.int32)
        for t in np.unique(tids):
            rows = tids == t
            split = scenario.tasks[t].train
            x[rows] = split.x[idx[rows]]
            y[rows] = split.y[idx[rows]]
        yield x, y, tids


def build(
    name: str, ds_or_list: Dataset | Sequence[Dataset], task_count: int | None, seed: int = 0, **kwargs
) -> Scenario:
    """Build a scenario by name for the CLIs: class_split, permuted, rotated or dataset_sequence.

    Args:
      name: one of ``SCENARIOS``.
      ds_or_list: one dataset, or (``dataset_sequence``) a list of them.
      task_count: the number of tasks (``dataset_sequence``: None or the number of datasets).
      seed: the scenario's seed.
      **kwargs: passed on to the scenario's function (e.g. ``val_fraction``, ``max_angle``, ``shape``).
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    if name == "dataset_sequence":
        datasets = [ds_or_list] if isinstance(ds_or_list, Dataset) else list(ds_or_list)
        if task_count not in (None, len(datasets)):
            raise ValueError(f"dataset_sequence makes one task per dataset ({len(datasets)}), not {task_count}")
        return dataset_sequence(datasets, seed=seed, **kwargs)
    if not isinstance(ds_or_list, Dataset):
        raise ValueError(f"scenario {name!r} takes exactly one dataset")
    if task_count is None:
        raise ValueError(f"scenario {name!r} needs a task_count")
    fn = {"class_split": class_split, "permuted": permuted, "rotated": rotated}[name]
    return fn(ds_or_list, task_count, seed=seed, **kwargs)
