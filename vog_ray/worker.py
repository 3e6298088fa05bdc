"""The scoring actor: holds the K frozen models and turns one shard into rows and statistics."""

from __future__ import annotations

import io
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vog_ray import storage
from vog_ray.checkpoints import Checkpoint, build_models
from vog_ray.config import ScoreConfig
from vog_ray.device_decode import DeviceJpegReader, PendingBatch, decode_batch
from vog_ray.gradients import BatchScores, Checkpoints, GradientOptions, score_batch
from vog_ray.rows import raw_column, shard_table
from vog_ray.samples import Batch, SampleError, ShardReader, ShardReadState, prefetched
from vog_ray.stats import class_stats_of

logger = logging.getLogger(__name__)


class SampleFailure(RuntimeError):
    """Raised under ``--strict`` at the first sample that cannot be scored."""


@dataclass
class ShardResult:
    """What one shard gives back to the driver: small, whatever the shard's size."""

    url: str
    shard_id: str
    part: str | None
    read: int
    scored: int
    failed: int
    incomplete: bool
    class_stats: dict[str, dict[int, list[float]]]
    errors: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    identity: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        record = self.__dict__.copy()
        record["class_stats"] = {
            window: {str(label): values for label, values in stats.items()}
            for window, stats in self.class_stats.items()
        }
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ShardResult":
        values = dict(record)
        values["class_stats"] = {
            window: {int(label): v for label, v in stats.items()}
            for window, stats in record["class_stats"].items()
        }
        return cls(**values)


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when this process sees a GPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class ShardScorer:
    """Scores whole shards; used directly in tests and wrapped as a Ray actor by the driver.

    ``working_dir`` is the driver's folder: where it exists on the actor's node, the actor works
    from it, so that relative local paths name the same files as for the driver.
    """

    def __init__(
        self,
        config: ScoreConfig,
        checkpoints: list[Checkpoint],
        windows: dict[str, tuple[int, int]],
        num_classes: int,
        *,
        working_dir: str | None = None,
    ) -> None:
        if working_dir and os.path.isdir(working_dir) and os.getcwd() != working_dir:
            os.chdir(working_dir)  # relative local shard paths mean what they mean to the driver
        if config.threads_per_worker:
            set_threads(config.threads_per_worker)
        self.config = config
        self.windows = windows
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        models = build_models(checkpoints, config.model, config.num_classes)
        self.models = Checkpoints([m.to(self.device) for m in models],
                                  batching=config.checkpoint_batching, compile=config.compile)
        self.reader = _reader(config, num_classes, self.device)
        self.options = GradientOptions(
            label=config.label, target=config.target,
            channels=config.channels, precision=config.precision,
        )

    def score_shard(self, url: str, shard_id: str) -> ShardResult:
        """Score every sample of one shard; write its rows; return counts and class statistics."""
        state = ShardReadState(url)
        keys: list[str] = []
        scores: list[BatchScores] = []
        labels_true: list[torch.Tensor] = []
        for batch in prefetched(self._batches(url, state), self.config.prefetch):
            if isinstance(self.reader, DeviceJpegReader):
                batch = decode_batch(batch, self.reader, self.device, state)
            self._fail_fast(state)
            if not batch.keys:
                continue
            scores.append(self._score(batch))
            keys.extend(batch.keys)
            labels_true.append(batch.labels)
        self._fail_fast(state)
        scores = [s.cpu() for s in scores]
        return self._finish(url, shard_id, state, keys, scores, labels_true)

    def _batches(self, url: str, state: ShardReadState) -> Iterator[Batch]:
        """The reader's batches; on CUDA pinned here, in the prefetch thread."""
        batches = self.reader.batches(url, state)
        return _pinned(batches) if self.device.type == "cuda" else batches

    def _score(self, batch: Batch) -> BatchScores:
        """One batch's scores, left on the device until the shard is done (no sync per batch)."""
        cuda = self.device.type == "cuda"
        images = batch.images.to(self.device, non_blocking=cuda)
        labels = batch.labels.to(self.device, non_blocking=cuda)
        return score_batch(self.models, images, labels, self.windows, self.options)

    def _fail_fast(self, state: ShardReadState) -> None:
        if self.config.strict and state.errors:
            error = state.errors[0]
            raise SampleFailure(
                f"--strict: sample {error.key!r} of shard {error.shard} failed at {error.stage} "
                f"({error.reason}): {error.message}"
            )

    def _finish(self, url, shard_id, state, keys, scores, labels_true) -> ShardResult:
        table, nonfinite = shard_table(
            url, keys, scores, labels_true, self.windows, self.config.label
        )
        state.errors.extend(
            SampleError(key, url, "gradient", "nonfinite_gradient",
                        "the input gradient has NaN or infinite values at some checkpoint")
            for key in nonfinite
        )
        self._fail_fast(state)
        part = None
        if table.num_rows:
            part = f"parts/{shard_id}-{uuid.uuid4().hex[:8]}.parquet"
            storage.write_bytes(storage.join(self.config.output, part), _parquet_bytes(table),
                                self.config.storage_options)
        return ShardResult(
            url=url, shard_id=shard_id, part=part, read=state.read, scored=table.num_rows,
            failed=len([e for e in state.errors if e.key is not None]),
            incomplete=state.incomplete, class_stats=_class_stats(table, self.windows),
            errors=[e.as_row() for e in state.errors],
            duplicates=_duplicates(table),
            identity=self._identity(url),
        )

    def _identity(self, url: str) -> dict[str, Any]:
        try:
            return storage.file_identity(url, self.config.storage_options)
        except (FileNotFoundError, OSError):
            return {}


def set_threads(threads: int) -> None:
    """Torch's intra-op threads for this process, and one inter-op thread (eager mode uses none,
    so more would only sit idle beside the prefetch thread)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        logger.debug("inter-op threads already started; left as they are")


def _reader(config: ScoreConfig, num_classes: int, device: torch.device) -> ShardReader:
    """On CUDA with ``--jpeg-decode auto`` JPEG files are decoded on the GPU, in batches."""
    if device.type == "cuda" and config.jpeg_decode == "auto":
        return DeviceJpegReader(config, num_classes)
    return ShardReader(config, num_classes)


def _pinned(batches: Iterator[Batch]) -> Iterator[Batch]:
    for batch in batches:
        if isinstance(batch, PendingBatch):
            yield batch
        else:
            yield Batch(batch.keys, batch.images.pin_memory(), batch.labels.pin_memory())


def _class_stats(table: pa.Table, windows) -> dict[str, dict[int, list[float]]]:
    if table.num_rows == 0:
        return {name: {} for name in windows}
    labels = table.column("label").to_numpy()
    return {
        name: {
            label: stats.to_list()
            for label, stats in class_stats_of(labels, _column(table, raw_column(name))).items()
        }
        for name in windows
    }


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _duplicates(table: pa.Table) -> int:
    return int(np.sum(_column(table, "duplicate_key"))) if table.num_rows else 0
