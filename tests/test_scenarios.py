"""Task sequences built from real data: class splits, permuted, rotated, dataset sequences, merged stream."""

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from modkd_jax.data import (
    Dataset,
    build,
    class_split,
    dataset_sequence,
    load,
    merged_stream,
    permuted,
    rotated,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def _offline(name):
    """Load an offline-archived dataset, skipping when its archives are absent."""
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"offline archives not found in {SHARED_DATA / name}")
    return load(name, data_dir=str(SHARED_DATA))


@pytest.fixture(scope="module")
def mnist():
    return _offline("mnist")


def _rows(x, y):
    """Multiset of (image bytes, label) pairs, to compare splits regardless of order."""
    return Counter((img.tobytes(), int(label)) for img, label in zip(x, y))


def _subset(ds, n):
    """The first `n` train and test examples of a dataset (real data, smaller)."""
    return dataclasses.replace(ds, train_x=ds.train_x[:n], train_y=ds.train_y[:n], test_x=ds.test_x[:n], test_y=ds.test_y[:n])


@pytest.mark.parametrize("source", ["digits", "mnist"])
def test_class_split_partitions_classes_and_labels(source, request):
    ds = request.getfixturevalue(source)
    sc = class_split(ds, 5, seed=3)
    assert sc.task_count == 5 and sc.block_sizes == (2,) * 5 and sc.offsets == (0, 2, 4, 6, 8) and sc.num_outputs == 10
    assert sc.input_shape == ds.train_x.shape[1:]
    all_classes = np.concatenate([t.classes for t in sc.tasks])
    assert sorted(all_classes.tolist()) == list(range(10))  # disjoint and covering
    for t in sc.tasks:
        for split in (t.train, t.val, t.test):
            assert split.x.dtype == np.uint8 and split.y.dtype == np.int32 and split.y_global.dtype == np.int32
            assert np.array_equal(t.classes[split.y], split.y_global)
            assert set(split.y.tolist()) == {0, 1}
        assert np.bincount(t.test.y_global, minlength=10)[t.classes].tolist() == np.bincount(ds.test_y)[t.classes].tolist()
    assert sum(len(t.train) + len(t.val) for t in sc.tasks) == len(ds.train_y)
    assert sum(len(t.test) for t in sc.tasks) == len(ds.test_y)


def test_class_order_follows_seed(digits):
    def order(seed):
        return [t.classes.tolist() for t in class_split(digits, 5, seed=seed).tasks]

    assert order(0) == order(0) and order(0) != order(1)
    ordered = class_split(digits, 5, seed=1, shuffle_classes=False)
    assert [t.classes.tolist() for t in ordered.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert ordered.tasks[1].name == "digits[2,3]"


@pytest.mark.parametrize("bad", [0, 3, 11, -2])
def test_bad_task_count_is_value_error(digits, bad):
    with pytest.raises(ValueError, match="task_count"):
        class_split(digits, bad)


def test_val_is_held_out_of_train_only(digits):
    sc = class_split(digits, 2, seed=0, val_fraction=0.2)
    for t in sc.tasks:
        pool = np.isin(digits.train_y, t.classes)
        assert _rows(t.train.x, t.train.y_global) + _rows(t.val.x, t.val.y_global) == _rows(
            digits.train_x[pool], digits.train_y[pool]
        )
        test_pool = np.isin(digits.test_y, t.classes)
        assert _rows(t.test.x, t.test.y_global) == _rows(digits.test_x[test_pool], digits.test_y[test_pool])
        per_class = np.bincount(digits.train_y[pool], minlength=10)[t.classes]
        assert np.bincount(t.val.y, minlength=len(t.classes)).tolist() == np.round(0.2 * per_class).astype(int).tolist()


def test_val_draw_depends_on_seed_and_zero_fraction_is_empty(digits):
    a, b = class_split(digits, 5, seed=0).tasks[0], class_split(digits, 5, seed=0).tasks[0]
    assert np.array_equal(a.val.x, b.val.x)
    c = class_split(digits, 5, seed=0, shuffle_classes=False).tasks[0]
    d = class_split(digits, 5, seed=9, shuffle_classes=False).tasks[0]
    assert not np.array_equal(c.val.x, d.val.x)
    empty = class_split(digits, 5, val_fraction=0.0).tasks[0].val
    assert empty.x.shape == (0, 8, 8, 1) and empty.x.dtype == np.uint8 and empty.y.shape == (0,)


def test_permuted_reproducible_distinct_and_pixel_preserving(digits):
    sc = permuted(digits, 3, seed=4)
    again = permuted(digits, 3, seed=4)
    other = permuted(digits, 3, seed=5)
    assert sc.block_sizes == (10, 10, 10) and [t.name for t in sc.tasks][2] == "permuted_digits#2"
    flat = digits.test_x.reshape(len(digits.test_x), -1)
    perms = []
    for t, t2, t3 in zip(sc.tasks, again.tasks, other.tasks):
        assert np.array_equal(t.train.x, t2.train.x) and not np.array_equal(t.test.x, t3.test.x)
        assert np.array_equal(t.classes, np.arange(10)) and np.array_equal(t.test.y, digits.test_y)
        out = t.test.x.reshape(len(flat), -1)
        assert np.array_equal(np.sort(out, axis=1), np.sort(flat, axis=1))  # pixel multiset per image
        # One fixed pixel map for all images: each output pixel equals one input pixel in every image.
        perm = np.array([np.flatnonzero(np.all(flat == out[:, [j]], axis=0))[0] for j in range(out.shape[1])])
        assert np.array_equal(flat[:, perm], out)
        perms.append(tuple(perm))
    assert len(set(perms)) == 3  # each task permutes differently


def test_rotated_zero_is_identity_and_quarter_turn_is_rot90(digits):
    sc = rotated(digits, 2, max_angle=180.0)
    assert [t.name for t in sc.tasks] == ["rotated_digits@0", "rotated_digits@90"]
    assert np.array_equal(sc.tasks[0].test.x, digits.test_x)
    assert np.array_equal(sc.tasks[1].test.x, np.rot90(digits.test_x, k=1, axes=(1, 2)))
    odd = rotated(digits, 4, max_angle=180.0).tasks[1]  # 45 degrees
    assert odd.test.x.dtype == np.uint8 and odd.test.x.shape == digits.test_x.shape
    assert not np.array_equal(odd.test.x, digits.test_x)


def test_dataset_sequence_mnist_then_fashion():
    mnist, fashion = _subset(_offline("mnist"), 600), _subset(_offline("fashion_mnist"), 600)
    sc = dataset_sequence([mnist, fashion], shape=(32, 32, 3), seed=0)
    assert sc.input_shape == (32, 32, 3) and sc.num_outputs == 20 and sc.offsets == (0, 10)
    assert [t.name for t in sc.tasks] == ["mnist", "fashion_mnist"]
    assert np.allclose(sc.norm[0], 0.5) and sc.norm[0].shape == (3,)
    for t, src in zip(sc.tasks, (mnist, fashion)):
        for split in (t.train, t.val, t.test):
            assert split.x.shape[1:] == (32, 32, 3) and split.x.dtype == np.uint8
            assert np.array_equal(split.x[..., 0], split.x[..., 2])  # gray replicated
        assert len(t.train) + len(t.val) == 600 and np.array_equal(t.test.y, src.test_y)
        # Resizing keeps the picture: mean brightness per image barely moves.
        assert np.abs(t.test.x.mean(axis=(1, 2, 3)) - src.test_x.mean(axis=(1, 2, 3))).max() < 3


def test_merged_stream_visits_each_training_example_once(digits):
    sc = permuted(digits, 3, seed=0)
    batches = list(merged_stream(sc, 100, seed=7))
    assert [len(b[0]) for b in batches[:-1]] == [100] * (len(batches) - 1) and 0 < len(batches[-1][0]) <= 100
    seen = Counter()
    for x, y, tid in batches:
        assert x.dtype == np.uint8 and y.dtype == np.int32 and tid.dtype == np.int32
        seen.update((int(t), img.tobytes(), int(label)) for img, label, t in zip(x, y, tid))
    expected = Counter()
    for t in sc.tasks:
        expected.update((t.id, img.tobytes(), int(label)) for img, label in zip(t.train.x, t.train.y))
    assert seen == expected
    first = next(merged_stream(sc, 100, seed=7))
    assert np.array_equal(first[0], batches[0][0])
    assert not np.array_equal(next(merged_stream(sc, 100, seed=8))[2], batches[0][2])
    assert len(set(batches[0][2].tolist())) > 1  # tasks are interleaved


def test_build_dispatches_by_name(digits):
    a = build("class_split", digits, 5, 2)
    b = class_split(digits, 5, seed=2)
    assert [t.classes.tolist() for t in a.tasks] == [t.classes.tolist() for t in b.tasks]
    assert build("rotated", digits, 2, 0).tasks[1].name == "rotated_digits@90"
    assert build("permuted", digits, 2, 0, val_fraction=0.0).tasks[0].val.x.shape[0] == 0
    assert build("dataset_sequence", [digits, digits], None, 0, shape=(8, 8, 1)).task_count == 2
    with pytest.raises(ValueError, match="unknown scenario"):
        build("blurred", digits, 2, 0)
    with pytest.raises(ValueError):
        build("class_split", [digits, digits], 2, 0)


def test_scenario_over_custom_dataset_computes_norm(digits):
    renamed = Dataset("my_digits", digits.train_x, digits.train_y, digits.test_x, digits.test_y, 10)
    mean, std = class_split(renamed, 2).norm
    assert abs(mean[0] - digits.train_x.mean() / 255) < 1e-4 and std.shape == (1,)
