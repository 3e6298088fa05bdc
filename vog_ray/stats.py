"""The Variance-of-Gradients math: raw scores, a streaming accumulator, mergeable class statistics.

Notation (Agarwal, D'souza and Hooker, CVPR 2022, Section 3): K checkpoints t = 1..K, S_t the
gradient map of an example at checkpoint t, reduced over colour channels.

    mu_p  = 1/K * sum_t S_t,p
    V_p   = sqrt(1/K * sum_t (S_t,p - mu_p)^2)       (population variance)
    vog_raw = mean_p V_p
    vog   = (vog_raw - m_c) / s_c                   (m_c, s_c over the examples of class c, ddof 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def vog_from_gradients(grads: np.ndarray | torch.Tensor) -> np.ndarray:
    """Raw VoG of N examples from their gradient maps at K checkpoints.

    Args:
        grads: shaped (K, N, *pixel_dims), already reduced over channels.

    Returns:
        float64 array of N raw scores: the mean over pixels of the per-pixel population standard
        deviation across the K checkpoints.
    """
    stack = torch.as_tensor(grads).to(torch.float64)
    if stack.ndim < 2:
        raise ValueError(
            f"grads must be shaped (K, N, *pixel_dims), got shape {tuple(stack.shape)}"
        )
    if stack.shape[0] < 2:
        raise ValueError(f"VoG needs at least 2 checkpoints, got K={stack.shape[0]}")
    spread = stack.var(dim=0, correction=0).sqrt()
    return spread.reshape(stack.shape[1], -1).mean(dim=1).numpy()


class VogAccumulator:
    """Folds gradient maps in one checkpoint at a time (Welford) without keeping them.

    Holds a running mean and sum of squared deviations per example and pixel, in float64 on the
    device of the first batch. ``update`` takes a (N, *pixel_dims) map; ``raw_scores`` gives the
    same values as :func:`vog_from_gradients` on the stacked maps.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def update(self, grad: torch.Tensor) -> None:
        """Fold in the gradient maps of one checkpoint, shaped (N, *pixel_dims)."""
        grad = torch.as_tensor(grad).to(torch.float64)
        self.count += 1
        if self._mean is None:
            self._mean = grad.clone()
            self._m2 = torch.zeros_like(grad)
            return
        delta = grad - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (grad - self._mean)

    def raw_scores(self) -> torch.Tensor:
        """float64 tensor of N raw VoG scores, on the accumulator's device."""
        if self._m2 is None or self.count < 2:
            raise ValueError(f"VoG needs at least 2 checkpoints, got {self.count}")
        spread = (self._m2 / self.count).clamp_min(0).sqrt()
        return spread.reshape(spread.shape[0], -1).mean(dim=1)


@dataclass
class ClassStats:
    """Count, mean and sum of squared deviations (M2) of raw scores of one class.

    ``merge`` combines two partial statistics exactly (Chan, Golub and LeVeque), so shards can be
    scored anywhere and reduced in any split.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def from_values(cls, values: np.ndarray) -> "ClassStats":
        """Statistics of a batch of raw scores, computed in float64."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls()
        mean = float(values.mean())
        return cls(int(values.size), mean, float(((values - mean) ** 2).sum()))

    def merge(self, other: "ClassStats") -> "ClassStats":
        """The statistics of the union of both sets of values."""
        if other.count == 0:
            return ClassStats(self.count, self.mean, self.m2)
        if self.count == 0:
            return ClassStats(other.count, other.mean, other.m2)
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return ClassStats(count, mean, m2)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0)."""
        return float(np.sqrt(max(self.m2, 0.0) / self.count)) if self.count else 0.0

    def to_list(self) -> list[float]:
        return [self.count, self.mean, self.m2]

    @classmethod
    def from_list(cls, values: list[float]) -> "ClassStats":
        return cls(int(values[0]), float(values[1]), float(values[2]))


def merge_all(parts: list[dict[int, ClassStats]]) -> dict[int, ClassStats]:
    """Merge per-class statistics of several parts, in the order given."""
    merged: dict[int, ClassStats] = {}
    for part in parts:
        for label, stats in part.items():
            merged[label] = merged.get(label, ClassStats()).merge(stats)
    return merged


def class_stats_of(labels: np.ndarray, raw: np.ndarray) -> dict[int, ClassStats]:
    """Per-class statistics of raw scores grouped by label."""
    labels = np.asarray(labels)
    return {
        int(label): ClassStats.from_values(raw[labels == label]) for label in np.unique(labels)
    }


# A class's spread below this fraction of its mean magnitude is treated as zero spread.
ZERO_SPREAD_RTOL = 1e-12


def normalization_flag(stats: ClassStats) -> str | None:
    """Why a class cannot be z-scored, or None when it can."""
    if stats.count < 2:
        return "class_too_small"
    if stats.std <= ZERO_SPREAD_RTOL * max(abs(stats.mean), np.finfo(np.float64).tiny):
        return "zero_spread"
    return None


def normalize(raw: np.ndarray, labels: np.ndarray, stats: dict[int, ClassStats]):
    """Class-normalized scores, with null (NaN) and a flag where a class cannot be normalized.

    Returns:
        (vog, flags): float64 array with NaN where not normalizable, and a list of flags.
    """
    raw = np.asarray(raw, dtype=np.float64)
    vog = np.full(raw.shape, np.nan)
    flags: list[str | None] = [None] * raw.size
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        class_stats = stats[int(label)]
        flag = normalization_flag(class_stats)
        if flag is None:
            vog[rows] = (raw[rows] - class_stats.mean) / class_stats.std
        else:
            for row in rows:
                flags[row] = flag
    return vog, flags
