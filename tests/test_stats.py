"""The VoG formula, the streaming accumulator and the mergeable class statistics."""

import numpy as np
import pytest
import torch

from vog_ray import ClassStats, VogAccumulator, vog_from_gradients
from vog_ray.stats import class_stats_of, merge_all, normalization_flag, normalize


def numpy_vog(grads: np.ndarray) -> np.ndarray:
    """The formula written out: mean over pixels of sqrt(1/K sum_t (S_t - mu)^2)."""
    k = grads.shape[0]
    mu = grads.sum(axis=0) / k
    v = np.sqrt(((grads - mu) ** 2).sum(axis=0) / k)
    return v.reshape(grads.shape[1], -1).mean(axis=1)


def test_worked_example():
    grads = np.array([[[[0.0, 2.0]]], [[[2.0, 2.0]]]])  # K=2, N=1, 1 x 2 map
    assert vog_from_gradients(grads).tolist() == [0.5]


@pytest.mark.parametrize("k", range(2, 11))
def test_matches_numpy_formula(k):
    rng = np.random.default_rng(k)
    grads = rng.normal(size=(k, 7, 5, 6)) * rng.uniform(0.1, 3, size=(1, 7, 1, 1))
    result = vog_from_gradients(grads)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, numpy_vog(grads), rtol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_streaming_accumulator_equals_batch_formula(k):
    rng = np.random.default_rng(10 + k)
    grads = rng.normal(loc=5.0, size=(k, 4, 3, 3)).astype(np.float32)
    accumulator = VogAccumulator()
    for t in range(k):
        accumulator.update(torch.from_numpy(grads[t]))
    expected = numpy_vog(grads.astype(np.float64))
    np.testing.assert_allclose(accumulator.raw_scores().numpy(), expected, rtol=1e-10)


def test_accumulator_needs_two_checkpoints():
    accumulator = VogAccumulator()
    accumulator.update(torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        accumulator.raw_scores()


def test_class_stats_merge_in_any_split_and_order():
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, size=500)
    labels = rng.integers(0, 4, size=500)
    for trial in range(20):
        cuts = np.sort(rng.choice(np.arange(1, 500), size=rng.integers(1, 12), replace=False))
        parts = [class_stats_of(labels[a:b], values[a:b])
                 for a, b in zip([0, *cuts], [*cuts, 500])]
        rng.shuffle(parts)
        merged = merge_all(parts)
        for label in range(4):
            chosen = values[labels == label]
            assert merged[label].count == chosen.size
            assert merged[label].mean == pytest.approx(chosen.mean(), rel=1e-12)
            assert merged[label].std == pytest.approx(chosen.std(ddof=0), rel=1e-10)


def test_normalize_flags_small_and_flat_classes():
    raw = np.array([1.0, 2.0, 3.0, 5.0, 4.0, 4.0])
    labels = np.array([0, 0, 0, 1, 2, 2])
    stats = class_stats_of(labels, raw)
    vog, flags = normalize(raw, labels, stats)
    np.testing.assert_allclose(vog[:3], (raw[:3] - 2.0) / np.std(raw[:3]))
    assert np.isnan(vog[3:]).all()
    assert flags == [None, None, None, "class_too_small", "zero_spread", "zero_spread"]
    assert normalization_flag(ClassStats(1, 2.0, 0.0)) == "class_too_small"
