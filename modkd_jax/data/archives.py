"""TFDS builders for MIND's other benchmarks, read from the official archives in a manual folder (no download).

- ``tinyimagenet``: TinyImageNet-200 (``tiny-imagenet-200.zip`` or its extracted folder): 64x64 RGB, 200
  classes (sorted wnids), ``train/<wnid>/images/*.JPEG`` for training, the labelled ``val`` split
  (``val/val_annotations.txt``) as the test split, as the reference does.
- ``core50``: CORe50 (``core50_128x128.zip`` or its folder ``core50_128x128/s<session>/o<object>/*.png``):
  the 50 objects as classes, every session pooled and resized to 64x64 (area interpolation), then one fixed
  random 80 / 20 train / test split: the reference's protocol (it draws the split per seed).
- ``synbols``: the reference's Synbols export (``train.npz`` / ``test.npz`` written by its
  ``utils/generate_synbols.ipynb``: ``x_*`` uint8 images, ``y_*`` attribute dicts whose ``char`` is the
  class): 200 classes, the characters sorted. The ``y_*`` arrays are pickled Python objects: load only
  archives you trust.

Each builder says which files it needs (``missing_in``); ``sources.load`` checks them before building.
Importing this module imports tensorflow-datasets (and registers the builders under these names).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

CORE50_SIZE = 64  # the reference trains on CORe50 resized to 64x64
CORE50_TEST_SHARE = 0.2
CORE50_SPLIT_SEED = 0


class _Files:
    """The files of an archive folder, or of a zip holding it: relative names and their bytes."""

    def __init__(self, root: Path, prefix: str):
        self.root, self.prefix, self.zip = root, prefix, None
        if root.suffix == ".zip":
            self.zip = zipfile.ZipFile(root)
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
            self.names = sorted(n[len(prefix) + 1:] for n in names if n.startswith(prefix + "/"))
        else:
            self.names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(f"{self.prefix}/{name}")
        return (self.root / name).read_bytes()


def _locate(manual_dir: Path, folder: str) -> Path | None:
    """``folder`` (extracted) or ``folder.zip`` inside ``manual_dir``, or ``manual_dir`` itself if it is ``folder``."""
    for candidate in (manual_dir / folder, manual_dir / f"{folder}.zip"):
        if candidate.exists():
            return candidate
    return manual_dir if manual_dir.name == folder and manual_dir.is_dir() else None


def _rgb(data: bytes, size: int | None = None) -> np.ndarray:
    """An encoded image as uint8 RGB (grayscale JPEGs too), optionally resized to ``size`` x ``size`` (area)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BOX)
    return np.asarray(img, np.uint8)


class _Manual(tfds.core.GeneratorBasedBuilder):
    """A builder that reads ``FOLDER`` (or ``FOLDER.zip``) from the manual folder only."""

    VERSION = tfds.core.Version("1.0.0")
    FOLDER = ""
    SHAPE: tuple[int, int, int] = (0, 0, 0)
    CLASSES = 0

    @classmethod
    def missing_in(cls, manual_dir: Path | None) -> list[str]:
        """What the manual folder lacks to build the dataset (empty when it can be built)."""
        if manual_dir is not None and manual_dir.is_dir() and _locate(manual_dir, cls.FOLDER) is not None:
            return []
        return [f"{cls.FOLDER}.zip (or the folder {cls.FOLDER}/)"]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=self.SHAPE),
                                                 "label": tfds.features.ClassLabel(num_classes=self.CLASSES)}),
            supervised_keys=("image", "label"))

    def _files(self, dl_manager) -> _Files:
        root = _locate(Path(dl_manager.manual_dir), self.FOLDER)
        if root is None:
            raise FileNotFoundError(f"{self.FOLDER}.zip or {self.FOLDER}/ not found in {dl_manager.manual_dir}")
        return _Files(root, self.FOLDER)


class Tinyimagenet(_Manual):
    """TinyImageNet-200: 100,000 training and 10,000 labelled validation (our test) images, 64x64, 200 classes."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
                                    "or its extracted folder tiny-imagenet-200/ in the folder given as --data_dir.")
    FOLDER, SHAPE, CLASSES = "tiny-imagenet-200", (64, 64, 3), 200

    def _split_generators(self, dl_manager):
        files = self._files(dl_manager)
        wnids = sorted(files.read("wnids.txt").decode().split())
        if len(wnids) != self.CLASSES:
            raise ValueError(f"wnids.txt lists {len(wnids)} classes, expected {self.CLASSES}")
        label = {w: i for i, w in enumerate(wnids)}
        train = [(n, label[n.split("/")[1]]) for n in files.names
                 if n.startswith("train/") and n.split("/")[2:3] == ["images"] and n.endswith(".JPEG")]
        rows = [line.split("\t") for line in files.read("val/val_annotations.txt").decode().splitlines() if line]
        test = [(f"val/images/{r[0]}", label[r[1]]) for r in rows]
        return {"train": self._generate_examples(files, train), "test": self._generate_examples(files, test)}

    def _generate_examples(self, files, items):
        for name, y in items:
            yield name, {"image": _rgb(files.read(name)), "label": y}


class Core50(_Manual):
    """CORe50: 50 objects in 11 sessions, pooled, 64x64, a fixed random 80 / 20 train / test split."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put core50_128x128.zip (https://vlomonaco.github.io/core50/) or its extracted "
                                    "folder core50_128x128/ in the folder given as --data_dir.")
    FOLDER, SHAPE, CLASSES = "core50_128x128", (CORE50_SIZE, CORE50_SIZE, 3), 50

    def _split_generators(self, dl_manager):
        files = self._files(dl_manager)
        items = [(n, int(n.split("/")[1][1:]) - 1) for n in files.names
                 if n.endswith(".png") and len(n.split("/")) == 3 and n.split("/")[1][:1] == "o"]
        if not items:
            raise ValueError(f"no s<session>/o<object>/*.png images in {files.root}")
        order = np.random.default_rng(CORE50_SPLIT_SEED).permutation(len(items))
        n_test = int(round(CORE50_TEST_SHARE * len(items)))
        test, train = sorted(order[:n_test]), sorted(order[n_test:])
        return {"train": self._generate_examples(files, [items[i] for i in train]),
                "test": self._generate_examples(files, [items[i] for i in test])}

    def _generate_examples(self, files, items):
        for name, y in items:
            if not 0 <= y < self.CLASSES:
                raise ValueError(f"{name}: object ids run from o1 to o{self.CLASSES}")
            yield name, {"image": _rgb(files.read(name), CORE50_SIZE), "label": y}


class Synbols(_Manual):
    """Synbols as the reference exports it: ``train.npz`` / ``test.npz``, 200 character classes."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Generate train.npz and test.npz with the MIND reference's "
                                    "utils/generate_synbols.ipynb and put them in the folder given as --data_dir.")
    FOLDER, SHAPE, CLASSES = "Synbols", (32, 32, 3), 200

    @classmethod
    def missing_in(cls, manual_dir: Path | None) -> list[str]:
        root = None if manual_dir is None else _synbols_root(manual_dir)
        return [] if root is not None else ["train.npz and test.npz"]

    def _split_generators(self, dl_manager):
        root = _synbols_root(Path(dl_manager.manual_dir))
        if root is None:
            raise FileNotFoundError(f"train.npz and test.npz not found in {dl_manager.manual_dir}")
        train, test = (np.load(root / f"{s}.npz", allow_pickle=True) for s in ("train", "test"))
        chars = sorted({y["char"] for y in train["y_train"]})
        if len(chars) != self.CLASSES:
            raise ValueError(f"train.npz holds {len(chars)} characters, expected {self.CLASSES}")
        index = {c: i for i, c in enumerate(chars)}
        return {"train": self._generate_examples(train["x_train"], train["y_train"], index),
                "test": self._generate_examples(test["x_test"], test["y_test"], index)}

    def _generate_examples(self, x, y, index):
        if x.shape[1:] != self.SHAPE:
            raise ValueError(f"Synbols images of shape {x.shape[1:]}, expected {self.SHAPE}")
        for i, (image, attrs) in enumerate(zip(x, y)):
            yield i, {"image": np.asarray(image, np.uint8), "label": index[attrs["char"]]}


def _synbols_root(manual_dir: Path) -> Path | None:
    """The folder holding the Synbols export: ``manual_dir`` or its ``Synbols/`` (the reference's layout)."""
    for root in (manual_dir, manual_dir / "Synbols"):
        if (root / "train.npz").is_file() and (root / "test.npz").is_file():
            return root
    return None


BUILDERS = {"tinyimagenet": Tinyimagenet, "core50": Core50, "synbols": Synbols}
