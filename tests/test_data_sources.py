"""Datasets load from real offline archives (MNIST, Fashion-MNIST), sklearn digits, and mocked CIFAR."""

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from modkd_jax.data import DATASETS, DataUnavailableError, load, normalization
from modkd_jax.data import sources

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(name):
    """Skip when the offline archives of `name` are not next to the repo."""
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"offline archives not found in {SHARED_DATA / name}")


@pytest.fixture(scope="module")
def mnist():
    _need("mnist")
    return load("mnist", data_dir=str(SHARED_DATA))  # the parent folder form


@pytest.fixture(scope="module")
def fashion():
    _need("fashion_mnist")
    return load("fashion_mnist", data_dir=str(SHARED_DATA / "fashion_mnist"))  # the own folder form


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """An empty archive folder and an empty TFDS folder, downloads switched off."""
    monkeypatch.setenv("MODKD_ALLOW_DOWNLOAD", "0")
    (tmp_path / "archives").mkdir()
    return tmp_path / "archives", tmp_path / "tfds"


def test_mnist_official_shapes_and_label_counts(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10
    assert mnist.train_x.shape == (60000, 28, 28, 1) and mnist.test_x.shape == (10000, 28, 28, 1)
    assert mnist.train_x.dtype == np.uint8 and mnist.train_y.dtype == np.int32
    assert np.bincount(mnist.train_y).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.test_y).tolist() == MNIST_TEST_COUNTS
    assert mnist.train_x.min() == 0 and mnist.train_x.max() == 255


def test_mnist_statistics_match_normalization(mnist):
    mean, std = normalization("mnist")
    pixels = mnist.train_x.astype(np.float64) / 255.0
    assert abs(pixels.mean() - mean[0]) < 1e-3 and abs(pixels.std() - std[0]) < 1e-3


def test_loaded_arrays_are_cached_and_read_only(mnist):
    assert load("mnist", data_dir=str(SHARED_DATA)) is mnist
    with pytest.raises(ValueError):
        mnist.train_x[0, 0, 0, 0] = 1


def test_fashion_mnist_balanced(fashion):
    assert fashion.train_x.shape == (60000, 28, 28, 1) and fashion.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(fashion.train_y).tolist() == [6000] * 10
    assert np.bincount(fashion.test_y).tolist() == [1000] * 10
    mean, std = normalization("fashion_mnist")
    pixels = fashion.train_x.astype(np.float64) / 255.0
    assert abs(pixels.mean() - mean[0]) < 1e-3 and abs(pixels.std() - std[0]) < 1e-3


def test_digits_split_is_fixed_stratified_and_scaled():
    ds = load("digits")
    assert ds.train_x.shape == (1437, 8, 8, 1) and ds.test_x.shape == (360, 8, 8, 1)
    assert ds.train_x.dtype == np.uint8 and ds.num_classes == 10
    assert ds.train_x.max() == 255 and ds.train_x.min() == 0
    assert set(np.unique(ds.train_x)) <= {v * 255 // 16 for v in range(17)}
    test_share = np.bincount(ds.test_y) / (np.bincount(ds.train_y) + np.bincount(ds.test_y))
    assert np.all(np.abs(test_share - 0.2) < 0.02)
    again = sources._load_digits()  # a fresh, uncached build gives the same split
    assert again is not ds and np.array_equal(again.train_x, ds.train_x) and np.array_equal(again.test_y, ds.test_y)
    mean, std = normalization("digits")
    assert abs(ds.train_x.mean() / 255 - mean[0]) < 1e-3 and abs((ds.train_x / 255).std() - std[0]) < 1e-3


def test_normalization_shapes():
    for name in DATASETS:
        mean, std = normalization(name)
        channels = 1 if name in ("mnist", "fashion_mnist", "digits") else 3
        assert mean.shape == std.shape == (channels,) and np.all((0 < mean) & (mean < 1) & (std > 0))


def test_unknown_name_is_one_sentence_value_error():
    with pytest.raises(ValueError, match="choose one of mnist, fashion_mnist"):
        load("imagenet")
    with pytest.raises(ValueError):
        normalization("imagenet")


def test_manual_dir_accepts_own_folder_parent_and_env(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    assert sources.resolve_manual_dir("mnist", tmp_path) == (tmp_path / "mnist").resolve()
    assert sources.resolve_manual_dir("mnist", tmp_path / "mnist") == (tmp_path / "mnist").resolve()
    monkeypatch.setenv("MODKD_DATA_DIR", str(tmp_path))
    assert sources.resolve_manual_dir("mnist") == (tmp_path / "mnist").resolve()
    monkeypatch.setenv("MODKD_TFDS_DIR", str(tmp_path / "prepared"))
    assert sources.resolve_tfds_dir() == (tmp_path / "prepared").resolve()


def test_missing_archives_offline_fail_fast_with_one_line(offline_env):
    archives, tfds_dir = offline_env
    start = time.monotonic()
    with pytest.raises(DataUnavailableError) as info:
        load("mnist", data_dir=str(archives), tfds_dir=str(tfds_dir))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message and "--data_dir" in message and "MODKD_DATA_DIR" in message
    assert not (tfds_dir / "mnist").exists()


@pytest.mark.parametrize("env", [False, True], ids=["flag", "env"])
def test_given_data_dir_that_is_missing_or_empty_is_an_error_even_when_prepared(tmp_path, monkeypatch, env, mnist):
    """MNIST is prepared (the fixture loaded it), yet a wrong folder is reported, not silently ignored."""
    (tmp_path / "empty").mkdir()
    for folder, words in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "holds no mnist archives")):
        if env:
            monkeypatch.setenv("MODKD_DATA_DIR", str(folder))
        with pytest.raises(DataUnavailableError, match=words) as info:
            load("mnist", data_dir=None if env else str(folder))
        message = str(info.value)
        assert "\n" not in message and message.startswith("MODKD_DATA_DIR" if env else "--data_dir")


def test_cli_with_a_wrong_data_dir_is_one_line_and_exit_2(tmp_path, capsys, mnist):
    from experiments import mind as cli

    workdir = tmp_path / "run"
    assert cli.main(["--dataset", "mnist", "--data_dir", str(tmp_path / "nowhere"), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data_dir") and "does not exist" in err and err.count("\n") == 0
    assert not workdir.exists()


def _internet_reachable() -> bool:
    """Whether the MNIST archive host resolves (then a real download could start)."""
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
    except OSError:
        return False
    return True


def test_download_attempt_without_network_fails_fast(tmp_path, monkeypatch):
    if _internet_reachable():
        pytest.skip("this machine has internet; the offline failure path cannot be observed")
    monkeypatch.setenv("MODKD_ALLOW_DOWNLOAD", "1")
    monkeypatch.delenv("MODKD_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "_SHARED_DATA_DIR", tmp_path / "no_shared_data")  # no archives anywhere
    start = time.monotonic()
    with pytest.raises(DataUnavailableError, match="no network"):
        load("mnist", tfds_dir=str(tmp_path / "tfds"))
    assert time.monotonic() - start < 30


def test_corrupt_archive_is_reported_not_built(tmp_path, monkeypatch):
    _need("mnist")
    monkeypatch.setenv("MODKD_ALLOW_DOWNLOAD", "0")
    archives = tmp_path / "mnist"
    shutil.copytree(SHARED_DATA / "mnist", archives)
    labels = archives / "t10k-labels-idx1-ubyte.gz"
    labels.chmod(0o644)
    labels.write_bytes(labels.read_bytes()[:1000])
    with pytest.raises(DataUnavailableError, match="do not match TFDS's checksums"):
        load("mnist", data_dir=str(archives), tfds_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / "mnist").exists()


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_mocked_tfds(name, classes, offline_env):
    tfds = pytest.importorskip("tensorflow_datasets")
    archives, tfds_dir = offline_env
    with tfds.testing.mock_data(num_examples=24):
        ds = load(name, data_dir=str(archives), tfds_dir=str(tfds_dir))
    assert ds.num_classes == classes
    assert ds.train_x.shape == (24, 32, 32, 3) and ds.test_x.shape == (24, 32, 32, 3)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int32
    assert ds.train_y.min() >= 0 and ds.train_y.max() < classes
    # Mocked data must not be cached: outside the mock the real (absent) data is reported.
    with pytest.raises(DataUnavailableError):
        load(name, data_dir=str(archives), tfds_dir=str(tfds_dir))
