"""Images read back from the shards by key, for the report's example grids."""

from __future__ import annotations

import io
import logging
import tarfile
from typing import Any

import numpy as np
from PIL import Image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vog_ray import storage
from vog_ray.config import IMAGE_EXTENSIONS
from vog_ray.report_figures import thumbnail

logger = logging.getLogger(__name__)


def fetch_images(
    wanted: dict[str, set[str]], extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    storage_options: dict[str, Any] | None = None,
) -> dict[tuple[str, str], Image.Image]:
    """Thumbnails of the wanted keys of each shard, keyed by ``(shard, key)``.

    Each shard is opened once and read front to back; other shards are not touched. Extensions
    are tried in the order given. A key whose image cannot be found or decoded is left out and
    logged; so is a whole shard that cannot be read. Only thumbnails are kept in memory.
    """
    images: dict[tuple[str, str], Image.Image] = {}
    for shard, keys in sorted(wanted.items()):
        found = _shard_images(shard, keys, extensions, storage_options)
        images.update({(shard, key): image for key, image in found.items()})
        if len(found) < len(keys):
            missing = sorted(keys - set(found))
            logger.warning("%d image(s) not found in shard %s, e.g. key %r; the report shows "
                           "them without a picture", len(missing), shard, missing[0])
    return images


def _shard_images(
    url: str, keys: set[str], extensions: tuple[str, ...],
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Image.Image]:
    files: dict[str, dict[str, bytes]] = {}

    def selected(name: str) -> bool:
        key, extension = base_plus_ext(name)
        return key in keys and extension is not None and extension.lower() in extensions

    try:
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb") as handle:
            for item in tar_file_iterator(handle, select_files=selected):
                key, extension = base_plus_ext(item["fname"])
                files.setdefault(key, {}).setdefault(extension.lower(), item["data"])
    except (OSError, EOFError, tarfile.TarError, ValueError) as error:
        logger.warning("cannot read images back from shard %s (%s); check that it is still "
                       "there and readable", url, storage.scrub(str(error), storage_options))
    images = {}
    for key, by_extension in files.items():
        extension = next(e for e in extensions if e in by_extension)
        try:
            images[key] = thumbnail(decode_image(by_extension[extension], extension))
        except (OSError, ValueError) as error:
            logger.warning("cannot decode image %s.%s in shard %s: %s", key, extension, url,
                           storage.scrub(str(error), storage_options))
    return images


def decode_image(data: bytes, extension: str) -> Image.Image:
    """An image file (or ``npy`` array) as a PIL image in mode L, RGB or RGBA."""
    if extension == "npy":
        return array_image(np.load(io.BytesIO(data), allow_pickle=False))
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("L", "RGB", "RGBA"):
            return image.copy()
        if image.mode in ("I", "I;16", "F"):
            return array_image(np.asarray(image))
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")


def array_image(array: np.ndarray) -> Image.Image:
    """An HxW, HxWxC or CxHxW array as an 8-bit image; other ranges are stretched to 0-255."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be HxW, HxWxC or CxHxW; got shape {array.shape}")
    if array.dtype != np.uint8:
        values = array.astype(np.float64)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if low >= 0 and high <= 1:
            low, high = 0.0, 1.0
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        array = np.nan_to_num(scaled * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))
