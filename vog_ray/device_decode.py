"""JPEG decoding on the actor's GPU: batched nvJPEG through ``torchvision.io.decode_jpeg``.

Used only when the actor runs on CUDA and ``--jpeg-decode auto``; on the CPU the shard reader
decodes every image with PIL as before. The reader thread then only splits the tar and leaves
JPEG files encoded; the actor decodes a batch of them in one call on its device and applies the
same resize, crop and normalization there. A file nvJPEG cannot decode (CMYK, progressive edge
cases, damage) is decoded on the CPU with PIL instead, so no sample the CPU path would score is
lost; one that PIL cannot read either is recorded as ``bad_image``.

Pixels may differ slightly from the CPU path: PIL decodes large JPEGs at a reduced DCT scale
before resizing (``Image.draft``), nvJPEG decodes at full size.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from vog_ray.samples import Batch, SampleError, ShardReader, ShardReadState

logger = logging.getLogger(__name__)

JPEG_KEYS = ("jpg", "jpeg")


@dataclass
class EncodedJpeg:
    """One sample's JPEG bytes as a CPU uint8 tensor, and its files for a CPU fallback."""

    data: torch.Tensor
    files: dict[str, bytes]


@dataclass
class PendingBatch(Batch):
    """A batch whose images are not decoded yet: ``items`` holds, per sample, an
    :class:`EncodedJpeg` or an image the CPU already prepared; ``images`` is empty."""

    items: list[EncodedJpeg | torch.Tensor] = field(default_factory=list)


class DeviceJpegReader(ShardReader):
    """A shard reader that leaves JPEG images encoded, for :func:`decode_batch`."""

    def _decode(self, files: dict[str, bytes]) -> EncodedJpeg | torch.Tensor:
        present = [key for key in self.config.image_keys if key in files]
        if present and present[0] in JPEG_KEYS and files[present[0]]:
            data = torch.frombuffer(bytearray(files[present[0]]), dtype=torch.uint8)
            return EncodedJpeg(data, files)
        return super()._decode(files)

    def _make_batch(self, keys: list[str], images: list, labels: list[int]) -> Batch:
        return PendingBatch(list(keys), torch.empty(0), torch.tensor(labels, dtype=torch.int64),
                            items=list(images))

    def decode_on_cpu(self, files: dict[str, bytes]) -> torch.Tensor:
        """The CPU path's decode of one sample (PIL, then the same transform)."""
        return ShardReader._decode(self, files)


def decode_batch(batch: Batch, reader: DeviceJpegReader, device: torch.device,
                 state: ShardReadState) -> Batch:
    """The batch with its images decoded and prepared on ``device``, in the same order.

    Samples that cannot be decoded at all are dropped from the batch and recorded in ``state``;
    a batch left with no sample has no keys and an empty ``images``.
    """
    if not isinstance(batch, PendingBatch):
        return batch
    positions = [i for i, item in enumerate(batch.items) if isinstance(item, EncodedJpeg)]
    decoded = _decode_all([batch.items[i].data for i in positions], reader.mode, device)
    images: dict[int, torch.Tensor] = {}
    for position, pixels in zip(positions, decoded):
        if pixels is not None:
            images[position] = pixels
    _transform_by_shape(images, reader)
    for position, item in enumerate(batch.items):
        if position not in images:
            image = _fallback(item, reader, batch.keys[position], state)
            if image is not None:
                images[position] = image.to(device, non_blocking=True)
    keep = sorted(images)
    if not keep:
        return Batch([], torch.empty(0, device=device), batch.labels[keep])
    stacked = reader.normalize(torch.stack([images[i] for i in keep]))
    return Batch([batch.keys[i] for i in keep], stacked, batch.labels[keep])


def _decode_all(data: list[torch.Tensor], mode: str, device: torch.device):
    """Decoded uint8 CHW images in order; None where nvJPEG fails on a file."""
    if not data:
        return []
    read_mode = ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY
    try:
        return _quiet_decode(data, read_mode, device)
    except RuntimeError:
        logger.debug("batched JPEG decode failed; decoding the %d files one by one", len(data))
    out = []
    for one in data:
        try:
            out.append(_quiet_decode([one], read_mode, device)[0])
        except RuntimeError:
            out.append(None)
    return out


def _quiet_decode(data: list[torch.Tensor], mode: ImageReadMode, device: torch.device):
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=mode, device=device)


def _transform_by_shape(images: dict[int, torch.Tensor], reader: ShardReader) -> None:
    """Resize, crop and scale in place, one batched call per distinct image shape."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in images.items():
        groups.setdefault(tuple(image.shape), []).append(position)
    for members in groups.values():
        prepared = reader.to_float(torch.stack([images[i] for i in members]))
        for position, image in zip(members, prepared):
            images[position] = image


def _fallback(item, reader: DeviceJpegReader, key: str, state: ShardReadState):
    if isinstance(item, torch.Tensor):
        return item
    try:
        return reader.decode_on_cpu(item.files)
    except Exception as error:  # noqa: BLE001 - any decoder failure is recorded per sample
        message = f"{type(error).__name__}: {error}"[:500]
        state.errors.append(SampleError(key, state.url, "decode", "bad_image", message))
        return None
