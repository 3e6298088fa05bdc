"""The one I/O layer: fsspec URLs for shards, checkpoints and outputs, local or remote alike."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """The fsspec filesystem and the protocol-free path of ``url``."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def expand_urls(patterns: list[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Brace-expand and glob each pattern; keep the order given, drop repeats.

    Plain URLs are kept even if they do not exist, so that a missing shard is reported by name
    when it is read rather than vanishing from the list.
    """
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            urls.extend(_glob(url, storage_options) if _GLOB_CHARS & set(url) else [url])
    return list(dict.fromkeys(urls))


def _glob(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs, path = filesystem(url, storage_options)
    found = sorted(fs.glob(path))
    if not found:
        raise FileNotFoundError(f"no file matches {url!r}; check the pattern and the bucket")
    return [_with_protocol(fs, url, item) for item in found]


def _with_protocol(fs, original: str, path: str) -> str:
    if isinstance(fs, LocalFileSystem) and "://" not in original:
        return path
    return fs.unstrip_protocol(path)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/'."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def list_dir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the files directly under a folder URL; empty when it does not exist.

    The listing is always fresh: files written meanwhile by other processes are seen.
    """
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a file so that readers see either nothing or all of it.

    On a local disk the bytes go to a temporary name in the same folder, then are renamed. On an
    object store a single PUT is made visible whole by the store itself.
    """
    fs, path = filesystem(url, storage_options)
    parent = os.path.dirname(path)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(parent, exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(temporary, "wb") as handle:
            handle.write(data)
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, data)


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove a file or folder tree if it exists."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def file_identity(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size and, where the store gives one, ETag or checksum of a file."""
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    identity: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for name in ("ETag", "etag", "md5Hash", "crc32c", "mtime"):
        if info.get(name) is not None:
            identity[name.lower()] = str(info[name])
            break
    return identity


@contextlib.contextmanager
def open_for_write(url: str, storage_options: dict[str, Any] | None = None):
    """A binary file handle whose content becomes visible whole, when the block ends cleanly."""
    fs, path = filesystem(url, storage_options)
    if not isinstance(fs, LocalFileSystem):
        yield from _open_remote_for_write(fs, path)
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(temporary, "wb") as handle:
            yield handle
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


def _open_remote_for_write(fs, path: str):
    """Upload inside an fsspec transaction: committed when the block ends, discarded on error."""
    with fs.transaction, fs.open(path, "wb") as handle:
        yield handle


_SECRET_MIN_LENGTH = 4


def scrub(text: str, storage_options: dict[str, Any] | None) -> str:
    """``text`` with every string in the storage options replaced by ``***``.

    Used on exception text before it reaches a log line, an error record or a message, since a
    failing store call may quote its endpoint, key or token.
    """
    for value in sorted(_string_values(storage_options or {}), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def _string_values(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if len(value) >= _SECRET_MIN_LENGTH else []
    if isinstance(value, dict):
        return [item for inner in value.values() for item in _string_values(inner)]
    if isinstance(value, (list, tuple)):
        return [item for inner in value for item in _string_values(inner)]
    return []
