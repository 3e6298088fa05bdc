"""Stream one WebDataset shard into preprocessed batches, recording every sample that fails."""

from __future__ import annotations

import io
import logging
import queue
import re
import tarfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vog_ray import storage
from vog_ray.config import ScoreConfig

logger = logging.getLogger(__name__)

NO_LABEL = -1


@dataclass
class SampleError:
    """One sample (or shard) that could not be scored, and why."""

    key: str | None
    shard: str
    stage: str
    reason: str
    message: str

    def as_row(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Batch:
    """Preprocessed images of up to ``batch_size`` samples of one shard, in shard order."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor


@dataclass
class ShardReadState:
    """What reading one shard saw: samples read, failures, and whether the tar was cut short."""

    url: str
    read: int = 0
    incomplete: bool = False
    errors: list[SampleError] = field(default_factory=list)


class ShardReader:
    """Turns one shard URL into batches; failures go to ``state.errors``, never raised."""

    def __init__(self, config: ScoreConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes
        self.mode = "RGB" if len(config.mean) == 3 else "L"
        self.geometry = v2.Compose([
            v2.Resize(config.image_size, antialias=True), v2.CenterCrop(config.image_size),
        ])

    def batches(self, url: str, state: ShardReadState) -> Iterator[Batch]:
        """Yield batches of the shard's decodable samples; record the others in ``state``."""
        keys: list[str] = []
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for key, files in self._samples(url, state):
            state.read += 1
            prepared = self._prepare(key, files, url, state)
            if prepared is None:
                continue
            keys.append(key)
            images.append(prepared[0])
            labels.append(prepared[1])
            if len(keys) == self.config.batch_size:
                yield self._make_batch(keys, images, labels)
                keys, images, labels = [], [], []
        if keys:
            yield self._make_batch(keys, images, labels)

    def _make_batch(self, keys: list[str], images: list[torch.Tensor], labels: list[int]) -> Batch:
        """Stack the samples and normalize them in one call for the whole batch."""
        return Batch(list(keys), self.normalize(torch.stack(images)),
                     torch.tensor(labels, dtype=torch.int64))

    def to_float(self, pixels: torch.Tensor) -> torch.Tensor:
        """Decoded images, (C, H, W) or (B, C, H, W), resized and cropped (skipped when they
        already fit) and scaled to [0, 1]."""
        channels = len(self.config.mean)
        have = pixels.shape[-3]
        if have == 1 and channels > 1:
            pixels = pixels.expand(*pixels.shape[:-3], channels, -1, -1)
        elif have != channels:
            raise ValueError(f"the image has {have} channels but --mean/--std have {channels}")
        size = self.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = self.geometry(pixels)
        return v2.functional.to_dtype(pixels, torch.float32, scale=True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images from :meth:`to_float`, normalized by --mean and --std."""
        return v2.functional.normalize(images, list(self.config.mean), list(self.config.std))

    def _samples(self, url: str, state: ShardReadState) -> Iterator[tuple[str, dict[str, bytes]]]:
        try:
            fs, path = storage.filesystem(url, self.config.storage_options)
            handle = fs.open(path, "rb")
        except (FileNotFoundError, OSError) as error:
            reason = "missing_shard" if isinstance(error, FileNotFoundError) else "unreadable_shard"
            state.errors.append(SampleError(None, url, "open", reason, self._text(error)))
            return
        with handle:
            yield from self._group(handle, url, state)
        if state.read == 0 and not state.errors:
            state.errors.append(SampleError(None, url, "read", "empty_shard",
                                            "the shard holds no sample; check how it was written"))

    def _group(self, handle, url: str, state: ShardReadState):
        """Group tar members into samples by key; a key seen again starts a new sample."""
        key, files = None, {}
        try:
            for item in tar_file_iterator(handle):
                prefix, suffix = base_plus_ext(item["fname"])
                if prefix is None:
                    continue
                if key is not None and (prefix != key or suffix.lower() in files):
                    yield key, files
                    files = {}
                key = prefix
                files[suffix.lower()] = item["data"]
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            self._cut_short(url, state, error)
            if key is not None and not any(name in files for name in self.config.image_keys):
                state.read += 1
                message = f"the shard ends inside this sample, after {sorted(files)}"
                state.errors.append(SampleError(key, url, "read", "truncated_sample", message))
                return
        if key is not None:
            yield key, files

    def _cut_short(self, url: str, state: ShardReadState, error: BaseException) -> None:
        """Record a shard whose tar stream breaks off; a 0-byte file counts as empty."""
        if state.read == 0 and not state.errors and "empty file" in str(error):
            state.errors.append(SampleError(None, url, "read", "empty_shard",
                                            "the shard is a 0-byte file; check how it was written"))
            return
        state.incomplete = True
        logger.warning("shard %s is cut short after %d samples: %s", url, state.read,
                       self._text(error))
        state.errors.append(SampleError(None, url, "read", "truncated_shard", self._text(error)))

    def _text(self, error: BaseException) -> str:
        return storage.scrub(_text(error), self.config.storage_options)

    def _prepare(self, key: str, files: dict[str, bytes], url: str, state: ShardReadState):
        label = self._label(key, files, url, state)
        if label is None:
            return None
        try:
            image = self._decode(files)
        except (_MissingImage, _EmptyImage) as error:
            state.errors.append(SampleError(key, url, "decode", error.reason, str(error)))
            return None
        except Exception as error:  # noqa: BLE001 - any decoder failure is recorded per sample
            state.errors.append(SampleError(key, url, "decode", "bad_image", self._text(error)))
            return None
        return image, label

    def _label(self, key: str, files: dict[str, bytes], url: str, state: ShardReadState):
        raw = files.get(self.config.label_key)
        if raw is None:
            if self.config.label == "pred":
                return NO_LABEL
            message = f"no '{self.config.label_key}' file; use --label pred for unlabeled data"
            state.errors.append(SampleError(key, url, "label", "missing_label", message))
            return None
        try:
            label = int(raw.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            message = f"label {raw[:40]!r} is not an integer"
            state.errors.append(SampleError(key, url, "label", "bad_label", message))
            return None
        if not 0 <= label < self.num_classes:
            message = f"label {label} is outside [0, {self.num_classes})"
            state.errors.append(SampleError(key, url, "label", "label_out_of_range", message))
            return None
        return label

    def _decode(self, files: dict[str, bytes]) -> torch.Tensor:
        for extension in self.config.image_keys:
            if extension in files:
                data = files[extension]
                pixels = _decode_array(data) if extension == "npy" else self._decode_pil(data)
                return self.to_float(pixels)
        raise _MissingImage(f"none of the image keys {list(self.config.image_keys)} is present; "
                            f"sample has {sorted(files)}")

    def _decode_pil(self, data: bytes) -> torch.Tensor:
        if not data:
            raise _EmptyImage("the image file is empty (0 bytes)")
        with Image.open(io.BytesIO(data)) as image:
            image.draft(self.mode, (self.config.image_size, self.config.image_size))
            array = np.asarray(image.convert(self.mode))
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _MissingImage(ValueError):
    reason = "missing_image"


class _EmptyImage(ValueError):
    reason = "empty_image"


def _decode_array(data: bytes) -> torch.Tensor:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    if array.ndim != 3:
        raise ValueError(f"npy image must be HxW, HxWxC or CxHxW, got shape {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if tensor.dtype == torch.uint8 else tensor.to(torch.float32)


def _text(error: BaseException) -> str:
    """``Type: message``, short, without the address of an in-memory buffer PIL puts there."""
    message = _BUFFER_REPR.sub("of this sample", str(error))
    return f"{type(error).__name__}: {message}"[:500]


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


_DONE = object()


def prefetched(iterator: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``iterator`` in a background thread, ``depth`` batches ahead of the consumer."""
    if depth <= 0:
        yield from iterator
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    failure: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if not _put_unless_stopped(buffer, item, stop):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread
            failure.append(error)
        finally:
            _put_unless_stopped(buffer, _DONE, stop)

    thread = threading.Thread(target=produce, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not _DONE:
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
    if failure:
        raise failure[0]


def _put_unless_stopped(buffer: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            buffer.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
