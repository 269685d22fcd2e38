"""Datasets held in memory as uint8 NHWC arrays: TFDS image sets and scikit-learn's digits.

MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 come from tensorflow-datasets. The
prepared data lives in ``tfds_dir`` (argument, else ``$MODKD_TFDS_DIR``, else
``~/tensorflow_datasets``); when it is missing, the dataset is built from the
official archives found in a manual folder (argument, else ``$MODKD_DATA_DIR``,
else ``<repo>/../shared/data``), which TFDS's download manager picks up by file
name and checks against its registered checksums, without touching the network.
Only when no archives are there, and ``$MODKD_ALLOW_DOWNLOAD`` is not ``"0"``,
does TFDS download them, after a 5-second reachability probe so that a machine
without internet fails at once instead of retrying for minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

MANUAL_DATASETS = ("tinyimagenet", "core50", "synbols")  # our TFDS builders (data/archives.py): manual folder only
DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", *MANUAL_DATASETS, "digits")
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", *MANUAL_DATASETS)

_REPO_DIR = Path(__file__).resolve().parents[2]
_SHARED_DATA_DIR = _REPO_DIR.parent / "shared" / "data"
_PROBE_TIMEOUT_S = 5.0

# Per-channel mean/std of the training images in [0, 1] units.
_NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Computed from the digits training split below (tests check it).
    "digits": ((0.3046,), (0.3760,)),
    # The MIND reference's (utils/transforms.py): ImageNet's for TinyImageNet, its own for CORe50 and Synbols.
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "core50": ((0.5998523831367493, 0.5575963854789734, 0.5395311713218689),
               (0.20457075536251068, 0.2166813313961029, 0.22945666313171387)),
    "synbols": ((0.47957573372395784, 0.4786930207950382, 0.4795725401730997),
                (0.2840923785401597, 0.28447272496390646, 0.28412646131981306)),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset in host memory: uint8 NHWC images, int32 labels."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image, so models can be built without peeking at arrays."""
        return tuple(int(d) for d in self.train_x.shape[1:])


class DataUnavailableError(RuntimeError):
    """The dataset is neither prepared nor obtainable; the message says in one sentence what to do."""


def _check_name(name: str) -> None:
    """Reject unknown dataset names early with one sentence listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _read_only(*arrays: np.ndarray) -> None:
    """Freeze cached arrays so a caller cannot corrupt the copy every later `load` returns."""
    for a in arrays:
        a.flags.writeable = False


def resolve_tfds_dir(tfds_dir: str | os.PathLike | None = None) -> Path:
    """Folder of TFDS prepared data: argument, else $MODKD_TFDS_DIR, else ~/tensorflow_datasets."""
    chosen = tfds_dir or os.environ.get("MODKD_TFDS_DIR") or "~/tensorflow_datasets"
    return Path(chosen).expanduser().resolve()


def resolve_manual_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Folder holding `name`'s archives: argument, else $MODKD_DATA_DIR, else ../shared/data.

    Args:
      name: the dataset's name.
      data_dir: the folder given; it may be the dataset's own folder or a parent holding `<name>/`.

    Returns:
      The folder, or None when nothing is given and ../shared/data does not exist.
    """
    chosen = data_dir or os.environ.get("MODKD_DATA_DIR")
    if not chosen:
        if not _SHARED_DATA_DIR.is_dir():
            return None
        chosen = _SHARED_DATA_DIR
    folder = Path(chosen).expanduser().resolve()
    return folder / name if (folder / name).is_dir() else folder


def _tfds():
    """Import tensorflow_datasets lazily (slow, pulls TensorFlow) and quiet TF's C++ logging."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF only decodes archives here; its oneDNN kernels print a notice to stderr on every load.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow_datasets as tfds

    return tfds


def _tfds_is_mocked(tfds) -> bool:
    """True inside `tfds.testing.mock_data`, where download_and_prepare is a no-op and reads are fake."""
    method = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(method, "__module__", "") != "tensorflow_datasets.core.dataset_builder"


def _is_prepared(builder) -> bool:
    """Whether TFDS has the dataset prepared (checked quietly when its folder does not exist)."""
    return Path(builder.data_path).is_dir() and builder.is_prepared()


def _archive_names(builder) -> list[str]:
    """File names TFDS expects for the builder's archives (from its registered checksums)."""
    return sorted(info.filename for info in (builder.url_infos or {}).values() if info.filename)


def _missing_archives(builder, manual_dir: Path | None) -> list[str]:
    """Archives of the builder not present in `manual_dir` (all of them when there is none)."""
    if hasattr(builder, "missing_in"):  # our manual-only builders say what they need
        return builder.missing_in(manual_dir)
    names = _archive_names(builder)
    if manual_dir is None or not manual_dir.is_dir():
        return names
    return [n for n in names if not (manual_dir / n).is_file()]


def _network_reachable(builder) -> bool:
    """Probe the first archive URL once with a short timeout, so an offline machine fails fast."""
    import requests

    urls = sorted((builder.url_infos or {}).keys())
    if not urls:
        return True
    try:
        requests.head(urls[0], timeout=_PROBE_TIMEOUT_S, allow_redirects=True)
    except requests.RequestException:
        return False
    return True


def _unavailable(name: str, tfds_dir: Path, why: str) -> DataUnavailableError:
    """The one-sentence error telling the user how to provide the archives offline."""
    example = f"../shared/data/{name}" if name in ("mnist", "fashion_mnist") else f"~/data/{name}"
    return DataUnavailableError(
        f"{name} is not prepared in {tfds_dir} and could not be downloaded ({why}); put the official"
        f" archives in a folder and pass --data_dir FOLDER (or set MODKD_DATA_DIR), e.g. --data_dir {example}"
    )


@contextlib.contextmanager
def _build_lock(tfds_dir: Path, name: str):
    """Serialise builds of one dataset across processes (e.g. pytest-xdist workers)."""
    tfds_dir.mkdir(parents=True, exist_ok=True)
    with open(tfds_dir / f".{name}.modkd.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_obtainable(builder, name: str, manual_dir: Path | None, tfds_dir: Path) -> None:
    """Fail fast, before writing anything, when archives are missing and downloading is off or offline."""
    missing = _missing_archives(builder, manual_dir)
    if missing:
        if manual_dir is None:
            where = "no archive folder given"
        elif len(missing) < len(_archive_names(builder)):
            where = f"{', '.join(missing)} missing from {manual_dir}"
        else:
            where = f"no archives in {manual_dir}"
        if hasattr(builder, "missing_in"):  # never downloaded: say what to put where
            raise DataUnavailableError(f"{name} is not prepared in {tfds_dir} and {where}: "
                                       f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        if os.environ.get("MODKD_ALLOW_DOWNLOAD", "1") == "0":
            raise _unavailable(name, tfds_dir, f"{where} and MODKD_ALLOW_DOWNLOAD=0")
        if not _network_reachable(builder):
            raise _unavailable(name, tfds_dir, f"{where} and no network")


def _prepare(builder, name: str, manual_dir: Path | None, tfds_dir: Path) -> None:
    """Build the TFDS dataset from manual archives, or download what is missing."""
    tfds = _tfds()
    missing = _missing_archives(builder, manual_dir)
    config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir) if manual_dir and manual_dir.is_dir() else None,
        try_download_gcs=bool(missing),
    )
    # Archive copies and extractions go to a scratch folder, removed after the build.
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-downloads-", dir=tfds_dir))
    try:
        builder.download_and_prepare(download_dir=str(scratch), download_config=config)
    except Exception as err:  # tfds raises many types: checksum, download, IO errors
        if type(err).__name__ == "NonMatchingChecksumError":  # not exported by tfds.download
            reason = f"the archives in {manual_dir} do not match TFDS's checksums"
        else:
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        with contextlib.suppress(OSError):
            (tfds_dir / name).rmdir()  # only when empty: leave nothing that looks like data
        raise _unavailable(name, tfds_dir, reason) from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole TFDS split into (uint8 images, int32 labels) numpy arrays."""
    tfds = _tfds()
    splits = builder.info.splits  # empty under tfds.testing.mock_data
    batch = splits[split].num_examples if split in splits else 0
    batch = batch or 10_000  # one batch when the size is known; never batch_size=-1 (maxsize)
    images, labels = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, batch_size=batch, shuffle_files=False)):
        images.append(ex["image"])
        labels.append(ex["label"])
    return np.concatenate(images).astype(np.uint8, copy=False), np.concatenate(labels).astype(np.int32)


def _builder(name: str, tfds_dir: Path):
    """The TFDS builder of ``name``: TFDS's own, or ours for the manual-only datasets (``archives``)."""
    tfds = _tfds()
    if name in MANUAL_DATASETS:
        from modkd_jax.data import archives

        return archives.BUILDERS[name](data_dir=str(tfds_dir))
    return tfds.builder(name, data_dir=str(tfds_dir))


def _load_tfds(name: str, manual_dir: Path | None, tfds_dir: Path) -> Dataset:
    """Prepare (if needed) and read a TFDS image-classification dataset."""
    tfds = _tfds()
    builder = _builder(name, tfds_dir)
    if not _tfds_is_mocked(tfds) and not _is_prepared(builder):
        _check_obtainable(builder, name, manual_dir, tfds_dir)
        with _build_lock(tfds_dir, name):
            builder = _builder(name, tfds_dir)
            if not _is_prepared(builder):
                _prepare(builder, name, manual_dir, tfds_dir)
                builder = _builder(name, tfds_dir)
    train_x, train_y = _read_split(builder, "train")
    test_x, test_y = _read_split(builder, "test")
    num_classes = int(builder.info.features["label"].num_classes)
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes)


def _load_digits() -> Dataset:
    """scikit-learn's 8x8 digits as uint8 (0..16 scaled to 0..255), fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.int64) * 255 // 16).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return Dataset("digits", train_x, train_y, test_x, test_y, 10)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, manual_dir: Path | None, tfds_dir: Path) -> Dataset:
    """Load once per (name, resolved folders) per process; arrays are made read-only."""
    ds = _load_digits() if name == "digits" else _load_tfds(name, manual_dir, tfds_dir)
    _read_only(ds.train_x, ds.train_y, ds.test_x, ds.test_y)
    return ds


def load(name: str, data_dir: str | None = None, tfds_dir: str | None = None) -> Dataset:
    """Load a dataset by name into memory (cached per process), building it offline when possible.

    Args:
      name: one of ``DATASETS``.
      data_dir: the folder of the official archives (``resolve_manual_dir``); when given (or
        ``$MODKD_DATA_DIR``) it must hold them all, even if a prepared copy exists.
      tfds_dir: the folder of TFDS prepared data (``resolve_tfds_dir``).

    Raises:
      DataUnavailableError: the dataset is neither prepared nor obtainable.
    """
    _check_name(name)
    if name == "digits":
        return _load_cached(name, None, Path())
    manual_dir = resolve_manual_dir(name, data_dir)
    resolved_tfds_dir = resolve_tfds_dir(tfds_dir)
    tfds = _tfds()
    if _tfds_is_mocked(tfds):  # fake data must never land in the cache
        return _load_tfds(name, manual_dir, resolved_tfds_dir)
    if data_dir or os.environ.get("MODKD_DATA_DIR"):  # checked even when a prepared copy exists: never ignored
        flag, given = ("--data_dir", data_dir) if data_dir else ("MODKD_DATA_DIR", os.environ["MODKD_DATA_DIR"])
        _check_given_folder(_builder(name, resolved_tfds_dir), name, flag, given, manual_dir)
    return _load_cached(name, manual_dir, resolved_tfds_dir)


def _check_given_folder(builder, name: str, flag: str, given, manual_dir: Path) -> None:
    """An explicitly given archive folder (``flag`` = ``given``) must exist and hold every archive of ``name``."""
    fix = (f"pass --data_dir FOLDER (or set MODKD_DATA_DIR) with the official {name} archives in FOLDER or "
           f"FOLDER/{name}, or give neither to use data already prepared by TFDS")
    if not manual_dir.is_dir():
        raise DataUnavailableError(f"{flag} {given} does not exist; {fix}")
    missing = _missing_archives(builder, manual_dir)
    if missing:
        raise DataUnavailableError(f"{flag} {given} holds no {name} archives ({', '.join(missing)} missing from "
                                   f"{manual_dir}); {fix}")


def normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of the training images in [0, 1] units, for input standardisation."""
    _check_name(name)
    mean, std = _NORMALIZATION[name]
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)
