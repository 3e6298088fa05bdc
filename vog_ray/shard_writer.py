"""Writing ``make-shards`` output: ``shard-NNNNNN.tar`` files and the JSON side files.

Shards are written with webdataset's ``TarWriter``, uncompressed, with fixed tar metadata, so the
same samples in the same order give byte-identical shards. A shard is closed before it would
exceed its size limit on disk, or when it holds the largest number of samples allowed.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from typing import Any

import fsspec
from webdataset import TarWriter

from .shard_sources import MakeShardsError

logger = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"

# Fixed tar metadata: together with the sorted file order it makes the shards reproducible.
_TAR_USER = "vog_ray"
_TAR_MODE = 0o444
_TAR_MTIME = 0.0
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE


def _padded(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _member_bytes(name: str, size: int) -> int:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, _TAR_MODE, int(_TAR_MTIME)
    info.uname = info.gname = _TAR_USER
    header = info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")
    return len(header) + _padded(size)


def _archive_bytes(members: int) -> int:
    """Size on disk of a stream-written tar whose members take ``members`` bytes."""
    return -(-(members + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


class ShardSink:
    """Writes samples into ``shard-NNNNNN.tar`` files, starting a new one at the limits."""

    def __init__(
        self,
        out: str,
        *,
        shard_size_bytes: int,
        max_samples_per_shard: int | None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        self.out = out.rstrip("/")
        self.shard_size_bytes = shard_size_bytes
        self.max_samples = max_samples_per_shard
        self.shards: list[str] = []
        self.bytes_written = 0
        self._handle: Any = None
        self._writer: TarWriter | None = None
        self._path = ""
        self._count = 0

    def write(self, key: str, extension: str, data: bytes, label: int) -> None:
        """Add one sample, opening the next shard first when this one would overflow."""
        label_bytes = str(label).encode("ascii")
        size = _member_bytes(f"{key}.cls", len(label_bytes))
        size += _member_bytes(f"{key}.{extension}", len(data))
        if self._writer is None or self._full(size):
            self._next_shard(size)
        self._writer.write({"__key__": key, "cls": label_bytes, extension: data})
        self._count += 1

    def _full(self, size: int) -> bool:
        if self.max_samples is not None and self._count >= self.max_samples:
            return True
        return _archive_bytes(self._writer.tarstream.offset + size) > self.shard_size_bytes

    def _next_shard(self, size: int) -> None:
        self.close()
        name = SHARD_NAME.format(len(self.shards))
        if _archive_bytes(size) > self.shard_size_bytes:
            logger.warning("one sample alone exceeds the shard size; %s will be larger", name)
        self._path = posixpath.join(self.root, name)
        self._handle = self.fs.open(self._path, "wb")
        self._writer = TarWriter(
            self._handle, user=_TAR_USER, group=_TAR_USER, mode=_TAR_MODE, compress=False,
            encoder=False, mtime=_TAR_MTIME,
        )
        self.shards.append(f"{self.out}/{name}")
        self._count = 0

    def close(self) -> None:
        """Finish the open shard, if any."""
        if self._writer is None:
            return
        self.bytes_written += _archive_bytes(self._writer.tarstream.offset)
        self._writer.close()
        self._handle.close()
        logger.debug("wrote %s (%d samples)", self.shards[-1], self._count)
        self._writer = self._handle = None

    def abort(self) -> None:
        """Close and remove the shard being written after a failure."""
        if self._writer is None:
            return
        self.shards.pop()
        try:
            self._writer.close()
            self._handle.close()
        finally:
            self._writer = self._handle = None
            if self.fs.exists(self._path):
                self.fs.rm(self._path)


def prepare_output(out: str, overwrite: bool, storage_options: dict[str, Any] | None) -> None:
    """Create the output folder; remove its old shards, or refuse unless ``overwrite``."""
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    if fs.exists(root) and not fs.isdir(root):
        raise MakeShardsError(f"{out}: exists and is not a folder; choose a folder for OUT.")
    fs.makedirs(root, exist_ok=True)
    old = fs.glob(posixpath.join(root, SHARD_GLOB))
    if old and not overwrite:
        raise MakeShardsError(
            f"{out}: already holds {len(old)} shard(s) ({posixpath.basename(old[0])}, ...); "
            "pass overwrite=True (--overwrite) to replace them, or choose another folder."
        )
    for path in old:
        fs.rm(path)


def write_json(out: str, name: str, payload: Any, storage_options: dict[str, Any] | None) -> str:
    """Write ``payload`` as ``out/name`` (indented UTF-8 JSON); returns the file's URL."""
    url = f"{out.rstrip('/')}/{name}"
    with fsspec.open(url, "w", encoding="utf-8", **(storage_options or {})) as handle:
        json.dump(payload, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    return url
