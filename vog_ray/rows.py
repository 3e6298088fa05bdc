"""Per-example output rows of one shard, built column-wise from the batch results."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from vog_ray.gradients import BatchScores
from vog_ray.samples import NO_LABEL


def raw_column(window: str) -> str:
    """Name of a window's raw score column; the whole run keeps the plain name."""
    return "vog_raw" if window == "all" else f"vog_raw_{window}"


def learned_at(correct: np.ndarray) -> np.ndarray:
    """First checkpoint index from which each example stays correct; -1 if never.

    Args:
        correct: bool array (N, K).
    """
    stays = np.flip(np.logical_and.accumulate(np.flip(correct, axis=1), axis=1), axis=1)
    first = stays.argmax(axis=1)
    return np.where(stays.any(axis=1), first, -1)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Number of t with correct at t and wrong at t + 1, per example."""
    return np.sum(correct[:, :-1] & ~correct[:, 1:], axis=1)


def shard_table(
    url: str,
    keys: list[str],
    scores: list[BatchScores],
    labels_true: list[torch.Tensor],
    windows: dict[str, tuple[int, int]],
    label_source: str,
) -> tuple[pa.Table, list[str]]:
    """The rows of one shard, without examples whose gradients were not finite.

    Returns:
        (table, keys of the examples left out because of non-finite values).
    """
    if not keys:
        return pa.table({"key": pa.array([], pa.string())}), []
    merged = {name: torch.cat([s.raw[name] for s in scores]).numpy() for name in windows}
    finite = torch.cat([s.finite for s in scores]).numpy()
    for values in merged.values():
        finite &= np.isfinite(values)
    keep = np.flatnonzero(finite)
    dropped = [keys[i] for i in np.flatnonzero(~finite)]
    columns = _columns(url, keys, scores, labels_true, keep, label_source)
    for name in windows:
        columns[raw_column(name)] = pa.array(merged[name][keep], pa.float64())
    return pa.table(columns), dropped


def _columns(url, keys, scores, labels_true, keep, label_source) -> dict[str, pa.Array]:
    labels = torch.cat([s.labels for s in scores]).numpy()[keep]
    truth = torch.cat(labels_true).numpy()[keep]
    preds = torch.cat([s.preds for s in scores]).numpy()[keep]
    has_truth = truth != NO_LABEL
    correct = preds == truth[:, None]
    learned = learned_at(correct)
    counts = Counter(keys)
    kept_keys = [keys[i] for i in keep]
    null = ~has_truth
    return {
        "key": pa.array(kept_keys, pa.string()),
        "shard": pa.array([url] * len(keep), pa.string()),
        "label": pa.array(labels, pa.int64()),
        "label_true": pa.array(truth, pa.int64(), mask=null),
        "label_source": pa.array([label_source] * len(keep), pa.string()),
        "pred_last": pa.array(preds[:, -1], pa.int64()),
        "correct_last": pa.array(correct[:, -1], pa.bool_(), mask=null),
        "preds": pa.array(list(preds.astype(np.int16)), pa.list_(pa.int16())),
        "correct": pa.array(list(correct), pa.list_(pa.bool_()), mask=null),
        "learned_at": pa.array(learned, pa.int32(), mask=null | (learned < 0)),
        "forgetting_events": pa.array(forgetting_events(correct), pa.int32(), mask=null),
        "margin_last": pa.array(torch.cat([s.margin_last for s in scores]).numpy()[keep]),
        "loss_last": pa.array(torch.cat([s.loss_last for s in scores]).numpy()[keep]),
        "duplicate_key": pa.array([counts[k] > 1 for k in kept_keys], pa.bool_()),
    }
