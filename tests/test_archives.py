"""MIND's other benchmarks from their official layouts: tiny archives of TinyImageNet-200 (zip), CORe50 (folder)
and the reference's Synbols export, built through TFDS into memory, with clear errors when the files are missing."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from modkd_jax import data
from modkd_jax.data import archives

WNIDS = [f"n{i:08d}" for i in range(200)]


def _colour(i: int) -> tuple[int, int, int]:
    """A flat colour per class, far enough apart to survive JPEG and resizing."""
    return (37 * i) % 256, (91 * i + 40) % 256, (53 * i + 200) % 256


def _encoded(colour, size: int, fmt: str, mode: str = "RGB") -> bytes:
    img = Image.new("RGB", (size, size), colour)
    if mode == "L":
        img = img.convert("L")
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def make_tinyimagenet(folder, per_class: int = 2):
    """``tiny-imagenet-200.zip`` in the official layout: 200 wnids, ``per_class`` training and one validation
    image each (one grayscale JPEG among them, as the real archive has)."""
    folder.mkdir(parents=True, exist_ok=True)
    annotations = []
    with zipfile.ZipFile(folder / "tiny-imagenet-200.zip", "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", "\n".join(reversed(WNIDS)) + "\n")  # not sorted in the file
        for i, w in enumerate(WNIDS):
            for j in range(per_class):
                mode = "L" if (i, j) == (3, 0) else "RGB"
                z.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{j}.JPEG", _encoded(_colour(i), 64, "JPEG", mode))
            z.writestr(f"tiny-imagenet-200/train/{w}/{w}_boxes.txt", "")
            z.writestr(f"tiny-imagenet-200/val/images/val_{i}.JPEG", _encoded(_colour(i), 64, "JPEG"))
            annotations.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(annotations) + "\n")
        z.writestr("tiny-imagenet-200/test/images/test_0.JPEG", _encoded((0, 0, 0), 64, "JPEG"))  # unlabelled
    return folder


def make_core50(folder, sessions: int = 11):
    """``core50_128x128/s<session>/o<object>/*.png``: one 128x128 frame per session and object."""
    root = folder / "core50_128x128"
    for s in range(1, sessions + 1):
        for o in range(1, 51):
            d = root / f"s{s}" / f"o{o}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"C_{s:02d}_{o:02d}_000.png").write_bytes(_encoded(_colour(o - 1), 128, "PNG"))
    return folder


def make_synbols(folder, per_class: int = 3):
    """The reference's export: ``Synbols/train.npz`` and ``test.npz`` with attribute dicts as labels."""
    root = folder / "Synbols"
    root.mkdir(parents=True, exist_ok=True)
    chars = [chr(0x3041 + i) for i in range(200)]
    for split, n in (("train", per_class), ("test", 1)):
        ys = np.array([{"char": c, "font": "x"} for c in chars for _ in range(n)], dtype=object)
        xs = np.stack([np.full((32, 32, 3), _colour(chars.index(y["char"])), np.uint8) for y in ys])
        np.savez(root / f"{split}.npz", **{f"x_{split}": xs, f"y_{split}": ys})
    return folder


def _close_colours(x, y, tol):
    means = x.reshape(len(x), -1, 3).mean(1)
    want = np.asarray([_colour(int(c)) for c in y], float)
    return np.abs(means - want).max() <= tol


def test_tinyimagenet_from_the_official_zip(tmp_path):
    ds = data.load("tinyimagenet", data_dir=str(make_tinyimagenet(tmp_path / "raw")), tfds_dir=str(tmp_path / "tfds"))
    assert ds.num_classes == 200 and ds.image_shape == (64, 64, 3)
    assert len(ds.train_y) == 400 and len(ds.test_y) == 200  # the labelled val split is the test split
    assert sorted(np.bincount(ds.train_y)) == [2] * 200
    # labels follow the sorted wnids (the reference's class order); images survive JPEG; grayscale becomes RGB
    gray = np.all(ds.train_x[..., :1] == ds.train_x, axis=(1, 2, 3))
    assert gray.sum() == 1 and ds.train_y[gray][0] == 3  # the one grayscale JPEG, as three equal channels
    assert _close_colours(ds.train_x[~gray], ds.train_y[~gray], 12) and _close_colours(ds.test_x, ds.test_y, 12)


def test_core50_pooled_resized_and_split_80_20(tmp_path):
    ds = data.load("core50", data_dir=str(make_core50(tmp_path / "raw")), tfds_dir=str(tmp_path / "tfds"))
    assert ds.num_classes == 50 and ds.image_shape == (64, 64, 3)
    assert (len(ds.train_y), len(ds.test_y)) == (440, 110)  # 550 frames pooled, 20 % held out
    assert set(np.unique(np.concatenate([ds.train_y, ds.test_y]))) == set(range(50))
    assert _close_colours(ds.train_x, ds.train_y, 1) and _close_colours(ds.test_x, ds.test_y, 1)


def test_synbols_from_the_reference_export(tmp_path):
    ds = data.load("synbols", data_dir=str(make_synbols(tmp_path / "raw")), tfds_dir=str(tmp_path / "tfds"))
    assert ds.num_classes == 200 and ds.image_shape == (32, 32, 3)
    assert (len(ds.train_y), len(ds.test_y)) == (600, 200)
    assert _close_colours(ds.train_x, ds.train_y, 0) and _close_colours(ds.test_x, ds.test_y, 0)


@pytest.mark.parametrize("name, needs", [("tinyimagenet", "tiny-imagenet-200.zip"), ("core50", "core50_128x128.zip"),
                                         ("synbols", "train.npz and test.npz")])
def test_missing_archives_are_one_clear_error(name, needs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataUnavailableError, match=needs) as err:
        data.load(name, data_dir=str(tmp_path / "empty"), tfds_dir=str(tmp_path / "tfds"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "tfds" / name).exists()  # nothing left that looks like data
    assert archives.BUILDERS[name].missing_in(tmp_path / "empty")


def _config(argv):
    from experiments import mind as cli

    return cli.resolve_config(cli.parser().parse_args(argv))


def test_the_paper_protocol_of_each_benchmark_is_the_preset():
    """What config.json records for ``--dataset X --task_count 10``: the reference's epochs, milestones,
    augmentation and tau, no validation split and max_prob; given a validation split, the rule is chosen."""
    want = {"tinyimagenet": dict(epochs=100, distill_epochs=120, lr_milestones=[0.7, 0.9], crop_pad=8,
                                 temperature=12.0, brightness=63 / 255),
            "core50": dict(epochs=20, distill_epochs=20, lr_milestones=[0.75], distill_milestones=[0.75],
                           temperature=3.0, brightness=0.5),
            "synbols": dict(epochs=25, distill_epochs=25, lr_milestones=[0.4, 0.8], distill_milestones=[0.6],
                            crop_pad=0, temperature=4.0),
            "cifar100": dict(epochs=50, distill_epochs=50, temperature=6.5)}
    for dataset, fields in want.items():
        cfg = _config(["--dataset", dataset, "--task_count", "10"])
        m = cfg["mind"]
        assert (cfg["task_count"], cfg["val_fraction"], m["arch"], m["batch_size"]) == (10, 0.0, "resnet32", 256)
        assert (m["lr"], m["distill_lr"], m["inference"]["task_inference"]) == (0.005, 0.035, "max_prob")
        for key, value in fields.items():
            assert m[key] == pytest.approx(value), (dataset, key)
        chosen = _config(["--dataset", dataset, "--val_fraction", "0.1"])["mind"]["inference"]["task_inference"]
        assert chosen == "auto"
        assert _config(["--dataset", dataset, "--val_fraction", "0.1", "--task_inference", "gauss_own_z"]
                       )["mind"]["inference"]["task_inference"] == "gauss_own_z"


def test_mind_runs_on_a_tinyimagenet_archive_through_the_cli(tmp_path):
    from experiments import mind as cli

    import json

    raw = make_tinyimagenet(tmp_path / "raw")
    argv = ["--dataset", "tinyimagenet", "--task_count", "10", "--data_dir", str(raw), "--tfds_dir",
            str(tmp_path / "tfds"), "--arch", "mlp", "--hidden", "32", "--epochs", "1", "--distill_epochs", "1",
            "--batch_size", "16", "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "tinyimagenet" and config["mind"]["temperature"] == 12.0
    assert config["mind"]["lr_milestones"] == [0.7, 0.9] and config["mind"]["crop_pad"] == 8
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["tasks_done"] == 10 and len(res["classes"]) == 10 and all(len(c) == 20 for c in res["classes"])
    til = np.asarray(res["accuracy_matrix"]["til"], float)
    assert np.all((til[-1] >= 0) & (til[-1] <= 1))
