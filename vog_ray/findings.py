"""The paper's two findings measured on the demo's audits: label noise and error by VoG decile."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from vog_ray import storage


def read_scores(output: str, storage_options=None):
    """An audit's ``scores.parquet`` as a pandas-free dict of numpy columns."""
    data = storage.read_bytes(storage.join(output, "scores.parquet"), storage_options)
    return pq.read_table(io.BytesIO(data))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outranks a negative (ties count half)."""
    from scipy.stats import rankdata

    positive = positive.astype(bool)
    count_pos, count_neg = int(positive.sum()), int((~positive).sum())
    if count_pos == 0 or count_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    above = ranks[positive].sum() - count_pos * (count_pos + 1) / 2
    return float(above / (count_pos * count_neg))


def deciles(values: np.ndarray) -> np.ndarray:
    """Decile index 0..9 of each value, lowest first, by rank (ties broken by position)."""
    order = np.argsort(values, kind="stable")
    bins = np.empty(len(values), dtype=np.int64)
    bins[order] = np.arange(len(values)) * 10 // max(len(values), 1)
    return bins


def label_noise(table, flipped_keys: list[str]) -> dict[str, Any]:
    keys = np.array(table.column("key").to_pylist())
    flipped = np.isin(keys, flipped_keys)
    result: dict[str, Any] = {"base_rate": float(flipped.mean()), "examples": int(len(keys))}
    for column in ("vog", "vog_late", "vog_early"):
        if column not in table.column_names:
            continue
        values = np.nan_to_num(table.column(column).to_numpy(zero_copy_only=False), nan=0.0)
        top = deciles(values) == 9
        result[column] = {
            "top_decile_share": float(flipped[top].mean()),
            "lift": float(flipped[top].mean() / max(flipped.mean(), 1e-12)),
            "roc_auc": roc_auc(values, flipped),
        }
    return result


def error_by_decile(table) -> list[float]:
    """Error rate (1 - correct_last) per VoG decile, lowest VoG first."""
    values = np.nan_to_num(table.column("vog").to_numpy(zero_copy_only=False), nan=0.0)
    wrong = ~np.asarray(table.column("correct_last").to_numpy(zero_copy_only=False), dtype=bool)
    bins = deciles(values)
    return [float(wrong[bins == d].mean()) for d in range(10)]


def findings(output: str, flipped_keys: list[str]) -> dict[str, Any]:
    """Both findings from the demo's three audits under ``output``."""
    return {
        "label_noise": label_noise(read_scores(storage.join(output, "audit-train")), flipped_keys),
        "label_noise_loss_target": label_noise(
            read_scores(storage.join(output, "audit-train-loss")), flipped_keys
        ),
        "test_error_by_decile": {
            label: error_by_decile(read_scores(storage.join(output, f"audit-test-{label}")))
            for label in ("true", "pred")
        },
    }
