"""Synthetic audits for the report and diff tests.

``make_digits_audit`` writes real WebDataset shards of scikit-learn's 8x8 digits and an audit
folder laid out as docs/output-layout.md describes, with plausible, seeded scores: higher VoG
goes with more errors, later learning and more forgetting, as in the paper.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits
from webdataset import TarWriter

from vog_ray import storage

NUM_CLASSES = 10
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_pixels(index: int) -> np.ndarray:
    """Digit ``index`` of scikit-learn's set as 8x8 uint8 (its 0-16 values stretched to 0-255)."""
    images = load_digits().images
    return (images[index] * 255 / 16).round().astype(np.uint8)


def _encode(pixels: np.ndarray, extension: str) -> bytes:
    if extension == "npy":
        buffer = io.BytesIO()
        np.save(buffer, pixels.astype(np.float32) / 255)
        return buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if extension == "png" else "JPEG")
    return buffer.getvalue()


def write_digit_shards(folder: str, *, shards: int = 3, per_shard: int = 40,
                       extension: str = "png", prefix: str = "digits") -> dict[str, list]:
    """Write ``shards`` tar shards under ``folder``; return the samples' keys, shards, labels."""
    digits = load_digits()
    samples: dict[str, list] = {"key": [], "shard": [], "label": []}
    for shard in range(shards):
        url = storage.join(folder, f"{prefix}-{shard:04d}.tar")
        fs, path = storage.filesystem(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as handle:
            writer = TarWriter(handle, encoder=False)
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                key = f"d{index:05d}"
                label = int(digits.target[index])
                pixels = (digits.images[index] * 255 / 16).round().astype(np.uint8)
                writer.write({"__key__": key, extension: _encode(pixels, extension),
                              "cls": str(label).encode()})
                samples["key"].append(key)
                samples["shard"].append(url)
                samples["label"].append(label)
            writer.close()
    return samples


def normalize(labels: np.ndarray, vog_raw: np.ndarray) -> np.ndarray:
    """``vog_raw`` z-scored within each label (population std); NaN for a class of one."""
    vog = np.full(len(vog_raw), np.nan)
    for label in np.unique(labels):
        rows = labels == label
        spread = vog_raw[rows].std()
        if rows.sum() > 1 and spread > 0:
            vog[rows] = (vog_raw[rows] - vog_raw[rows].mean()) / spread
    return vog


def _trajectory(rng: np.random.Generator, z: float, correct_last: bool, checkpoints: int):
    """Per-checkpoint correctness: higher-VoG examples are learned later and forgotten more."""
    if not correct_last:
        correct = rng.random(checkpoints) < 0.2
        correct[-1] = False
        return correct
    learned = int(min(checkpoints - 1, rng.poisson(0.5 + max(z, 0.0))))
    correct = np.arange(checkpoints) >= learned
    if learned >= 2 and rng.random() < 0.5:
        correct[learned - 2] = True
    return correct


def build_scores(keys: list[str], shards: list[str], labels: list[int], vog_raw: np.ndarray,
                 *, seed: int = 0, checkpoints: int = 5, with_labels: bool = True) -> pa.Table:
    """A ``scores.parquet`` table with every column of the layout, consistent with ``vog_raw``."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels, np.int64)
    vog = normalize(labels_array, np.asarray(vog_raw, np.float64))
    z = np.nan_to_num(vog)
    correct_last = rng.random(len(keys)) > 1 / (1 + np.exp(-(1.5 * z - 3)))
    trajectories = [_trajectory(rng, z[i], bool(correct_last[i]), checkpoints)
                    for i in range(len(keys))]
    preds = [[int(y) if ok else int((y + 1 + t) % NUM_CLASSES) for t, ok in enumerate(c)]
             for y, c in zip(labels_array, trajectories, strict=True)]
    learned = [_learned_at(c) for c in trajectories]
    forgetting = [int(np.sum(c[:-1] & ~c[1:])) for c in trajectories]
    flags = [None if not np.isnan(v) else "class_too_small" for v in vog]
    known = (lambda values: values) if with_labels else (lambda values: [None] * len(values))
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "shard": pa.array(shards, pa.string()),
        "label": pa.array(labels_array, pa.int64()),
        "label_true": pa.array(known(labels_array.tolist()), pa.int64()),
        "label_source": pa.array(["true" if with_labels else "pred"] * len(keys)),
        "pred_last": pa.array([p[-1] for p in preds], pa.int64()),
        "correct_last": pa.array(known([bool(c[-1]) for c in trajectories]), pa.bool_()),
        "preds": pa.array(preds, pa.list_(pa.int16())),
        "correct": pa.array(known([c.tolist() for c in trajectories]), pa.list_(pa.bool_())),
        "learned_at": pa.array(known(learned), pa.int32()),
        "forgetting_events": pa.array(known(forgetting), pa.int32()),
        "margin_last": pa.array(rng.normal(2.0, 1.0, len(keys)) - z),
        "loss_last": pa.array(np.abs(rng.normal(0.3, 0.2, len(keys))) + np.maximum(z, 0)),
        "duplicate_key": pa.array([False] * len(keys)),
        "vog_raw": pa.array(np.asarray(vog_raw, np.float64)),
        "vog": pa.array(vog, mask=np.isnan(vog)),
        "vog_abs": pa.array(np.abs(vog), mask=np.isnan(vog)),
        "vog_flag": pa.array(flags, pa.string()),
    })


def _learned_at(correct: np.ndarray) -> int | None:
    for start in range(len(correct)):
        if correct[start:].all():
            return start
    return None


def class_stats(scores: pa.Table) -> pa.Table:
    """``class_stats.parquet`` of the ``all`` window, from the scores themselves."""
    labels = scores.column("label").to_numpy()
    raw = scores.column("vog_raw").to_numpy()
    rows = []
    for label in np.unique(labels):
        values = raw[labels == label]
        flag = None if len(values) > 1 and values.std() > 0 else "class_too_small"
        rows.append({"window": "all", "label": int(label), "count": len(values),
                     "mean": float(values.mean()), "std": float(values.std()), "flag": flag})
    return pa.Table.from_pylist(rows)


def _write_parquet(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(url, buffer.getvalue())


def write_audit(folder: str, scores: pa.Table, *, errors: list[dict] | None = None,
                checkpoints: int = 5, options: dict | None = None) -> str:
    """Write scores, class statistics, errors and ``manifest.json`` under ``folder``."""
    errors = errors or []
    shard_urls = list(dict.fromkeys(scores.column("shard").to_pylist()))
    _write_parquet(storage.join(folder, "scores.parquet"), scores)
    _write_parquet(storage.join(folder, "class_stats.parquet"), class_stats(scores))
    error_schema = pa.schema([(name, pa.string()) for name in
                              ("key", "shard", "stage", "reason", "message")])
    _write_parquet(storage.join(folder, "errors.parquet"),
                   pa.Table.from_pylist(errors, schema=error_schema))
    per_shard = scores.column("shard").to_pylist()
    shards = [{"url": url, "id": f"{i:016x}", "part": f"parts/{i:016x}-0.parquet",
               "read": per_shard.count(url) + sum(e["shard"] == url for e in errors),
               "scored": per_shard.count(url), "failed": sum(e["shard"] == url for e in errors),
               "incomplete": False} for i, url in enumerate(shard_urls)]
    manifest = {
        "format": 1, "created": "2026-12-03T20:00:00Z", "wall_time_s": 12.3,
        "model": "synthetic:digits-mlp", "num_classes": NUM_CLASSES,
        "checkpoints": [{"url": f"file:///checkpoints/epoch-{i:02d}.pt", "size": 1000 + i,
                         "sha256": f"{i:064x}"} for i in range(checkpoints)],
        "preprocessing": {"image_size": 8, "mean": [0.5], "std": [0.5]},
        "options": options or {"label": "true", "target": "logit", "channels": "mean",
                               "windows": {"all": [0, checkpoints]}, "batch_size": 64,
                               "precision": "fp32", "image_keys": ["png", "jpg", "npy"]},
        "shards": shards,
        "counts": {"shards": len(shards), "read": scores.num_rows + len(errors),
                   "scored": scores.num_rows, "failed": len(errors)},
        "class_names": CLASS_NAMES,
        "outputs": {"scores": "scores.parquet", "class_stats": "class_stats.parquet",
                    "errors": "errors.parquet"},
        "versions": {"vog_ray": "0.1.0"},
        "config": {},
    }
    storage.write_bytes(storage.join(folder, "manifest.json"), json.dumps(manifest).encode())
    return folder


def make_digits_audit(folder: str, *, shards: int = 3, per_shard: int = 40, seed: int = 0,
                      extension: str = "png", with_labels: bool = True) -> str:
    """Shards under ``folder/shards`` and an audit of them under ``folder/audit``."""
    samples = write_digit_shards(storage.join(folder, "shards"), shards=shards,
                                 per_shard=per_shard, extension=extension)
    rng = np.random.default_rng(seed)
    vog_raw = np.exp(rng.normal(-3.0, 0.6, len(samples["key"])))
    scores = build_scores(samples["key"], samples["shard"], samples["label"], vog_raw, seed=seed,
                          with_labels=with_labels)
    first_shard = samples["shard"][0]
    errors = [{"key": "d99990", "shard": first_shard, "stage": "decode", "reason": "bad_image",
               "message": "OSError: cannot identify image file"},
              {"key": None, "shard": first_shard, "stage": "read", "reason": "truncated_shard",
               "message": "ReadError: unexpected end of data"}]
    return write_audit(storage.join(folder, "audit"), scores, errors=errors)
