"""Reading the sources of ``make-shards``: a class-folder tree or a ``path,label`` table.

Lists the files to store with their class ids and the class names, gives each file its
WebDataset key and extension in natural order, and reads and checks the image bytes. Every file
that cannot be stored becomes a ``BadFile`` with one of the reasons below.
"""

from __future__ import annotations

import io
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import natsort
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "ppm")
TABLE_FORMATS: dict[str, str] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

_KEY_UNSAFE = re.compile(r"[.\\\x00-\x1f]")
_CHUNK_PER_WORKER = 16

# Reasons recorded in bad_files.json.
UNKNOWN_EXTENSION = "unknown_extension"
UNREADABLE = "unreadable"
NOT_AN_IMAGE = "not_an_image"
OUTSIDE_CLASS_FOLDER = "outside_class_folder"
HIDDEN = "hidden"
MISSING_LABEL = "missing_label"
INVALID_LABEL = "invalid_label"
KEY_COLLISION = "key_collision"


class MakeShardsError(ValueError):
    """The source or the output location cannot be used as given."""


@dataclass(frozen=True)
class SourceFile:
    """One image to store: where to read it, the path its key comes from, its class id."""

    url: str
    relpath: str
    label: int


@dataclass(frozen=True)
class BadFile:
    """A file that was not stored, with a reason from the constants above."""

    path: str
    reason: str
    message: str


def sample_key(relpath: str) -> str:
    """The WebDataset key of a source path: no extension, dots replaced by ``_``."""
    stem = posixpath.splitext(relpath.replace("\\", "/"))[0]
    segments = [part for part in stem.split("/") if part not in ("", ".")]
    return "/".join(_KEY_UNSAFE.sub("_", part) for part in segments)


def file_extension(relpath: str) -> str:
    """The lower-cased extension without its dot (``""`` when there is none)."""
    return posixpath.splitext(relpath)[1].lstrip(".").lower()


# ---------------------------------------------------------------------------------------------
# Listing the source


def list_source(
    src: str, storage_options: dict[str, Any] | None = None
) -> tuple[list[SourceFile], list[str], list[BadFile]]:
    """Files to store, class names (index = class id) and files rejected while listing."""
    fs, path = fsspec.core.url_to_fs(src, **(storage_options or {}))
    table_format = TABLE_FORMATS.get(posixpath.splitext(path)[1].lower())
    if table_format and fs.isfile(path):
        return _list_table(fs, path, table_format)
    if fs.isdir(path):
        return _list_folder(fs, path.rstrip("/"))
    raise MakeShardsError(
        f"{src}: expected a folder with one sub-folder per class, or a .csv/.parquet file with "
        "columns path,label; found neither. Check the path."
    )


def _list_folder(fs: Any, root: str) -> tuple[list[SourceFile], list[str], list[BadFile]]:
    entries = fs.ls(root, detail=True)
    classes = sorted(
        posixpath.basename(entry["name"].rstrip("/"))
        for entry in entries
        if entry["type"] == "directory"
        and not posixpath.basename(entry["name"].rstrip("/")).startswith(".")
    )
    if not classes:
        raise MakeShardsError(
            f"{fs.unstrip_protocol(root)}: no class sub-folders found; put the images of each "
            "class in their own sub-folder (SRC/<class>/<image>)."
        )
    class_ids = {name: index for index, name in enumerate(classes)}
    files, bad = [], []
    for path in fs.find(root):
        relpath = path[len(root):].lstrip("/")
        parts = relpath.split("/")
        if any(part.startswith(".") for part in parts):
            bad.append(BadFile(relpath, HIDDEN, "hidden file or folder"))
        elif len(parts) < 2:
            bad.append(BadFile(relpath, OUTSIDE_CLASS_FOLDER, "not inside a class sub-folder"))
        else:
            files.append(SourceFile(fs.unstrip_protocol(path), relpath, class_ids[parts[0]]))
    return files, classes, bad


def _read_table(fs: Any, path: str, table_format: str) -> pa.Table:
    with fs.open(path, "rb") as handle:
        if table_format == "csv":
            options = pa_csv.ConvertOptions(column_types={"path": pa.string()})
            table = pa_csv.read_csv(handle, convert_options=options)
        else:
            table = pq.read_table(handle)
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise MakeShardsError(
            f"{fs.unstrip_protocol(path)}: missing column(s) {sorted(missing)}; the table needs "
            f"columns path,label, got {table.column_names}."
        )
    return table.select(["path", "label"])


def _list_table(
    fs: Any, path: str, table_format: str
) -> tuple[list[SourceFile], list[str], list[BadFile]]:
    table = _read_table(fs, path, table_format)
    label_type = table.schema.field("label").type
    if not (pa.types.is_integer(label_type) or _is_text(label_type)):
        raise MakeShardsError(
            f"{fs.unstrip_protocol(path)}: column label must hold class names or integer class "
            f"ids, got {label_type}."
        )
    rows = table.to_pylist()
    base = posixpath.dirname(path)
    if pa.types.is_integer(label_type):
        return _table_files_with_ids(fs, base, rows)
    return _table_files_with_names(fs, base, rows)


def _is_text(data_type: pa.DataType) -> bool:
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _table_url(fs: Any, base: str, written: str) -> str:
    if "://" in written:
        return written
    if written.startswith("/"):
        return fs.unstrip_protocol(written)
    return fs.unstrip_protocol(posixpath.join(base, written))


def _table_relpath(written: str) -> str:
    return written.split("://", 1)[-1].lstrip("/")


def _table_files_with_ids(
    fs: Any, base: str, rows: list[dict[str, Any]]
) -> tuple[list[SourceFile], list[str], list[BadFile]]:
    files, bad = [], []
    for row in rows:
        written, label = row["path"] or "", row["label"]
        if label is None:
            bad.append(BadFile(written, MISSING_LABEL, "the label cell is empty"))
        elif label < 0:
            bad.append(BadFile(written, INVALID_LABEL, f"class id {label} is negative"))
        else:
            files.append(SourceFile(_table_url(fs, base, written), _table_relpath(written), label))
    top = max((item.label for item in files), default=-1)
    return files, [str(index) for index in range(top + 1)], bad


def _table_files_with_names(
    fs: Any, base: str, rows: list[dict[str, Any]]
) -> tuple[list[SourceFile], list[str], list[BadFile]]:
    classes = sorted({row["label"] for row in rows if row["label"]})
    class_ids = {name: index for index, name in enumerate(classes)}
    files, bad = [], []
    for row in rows:
        written, label = row["path"] or "", row["label"]
        if not label:
            bad.append(BadFile(written, MISSING_LABEL, "the label cell is empty"))
        else:
            url = _table_url(fs, base, written)
            files.append(SourceFile(url, _table_relpath(written), class_ids[label]))
    return files, classes, bad


def assign_keys(
    files: Iterable[SourceFile],
) -> tuple[list[tuple[str, str, SourceFile]], list[BadFile]]:
    """Natural order, keys and extensions; rejects unknown extensions and colliding keys."""
    kept: list[tuple[str, str, SourceFile]] = []
    bad: list[BadFile] = []
    owners: dict[str, str] = {}
    for item in natsort.natsorted(files, key=lambda source: source.relpath):
        extension = file_extension(item.relpath)
        key = sample_key(item.relpath)
        if extension not in IMAGE_EXTENSIONS:
            expected = "/".join(IMAGE_EXTENSIONS)
            message = f"extension {extension!r} is not one of {expected}"
            bad.append(BadFile(item.relpath, UNKNOWN_EXTENSION, message))
        elif not key:
            bad.append(BadFile(item.relpath, KEY_COLLISION, "the path gives an empty key"))
        elif key in owners:
            message = f"gives the same key {key!r} as {owners[key]}; rename one of them"
            bad.append(BadFile(item.relpath, KEY_COLLISION, message))
        else:
            owners[key] = item.relpath
            kept.append((key, extension, item))
    return kept, bad


# ---------------------------------------------------------------------------------------------
# Reading and checking images


def load_image_bytes(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[bytes | None, str, str]:
    """The file's bytes if it is an image PIL can decode, else ``None`` with a reason."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            data = handle.read()
    except OSError as error:
        return None, UNREADABLE, f"{type(error).__name__}: {error}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        return None, NOT_AN_IMAGE, "PIL recognises no image format in this file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, NOT_AN_IMAGE, f"{type(error).__name__}: {error}"
    return data, "", ""


def load_entries(
    entries: Sequence[tuple[str, str, SourceFile]],
    workers: int,
    storage_options: dict[str, Any] | None,
) -> Iterator[tuple[tuple[str, str, SourceFile], tuple[bytes | None, str, str]]]:
    """Entries with their loaded bytes, in input order, reading ``workers`` files at a time."""

    def load(entry: tuple[str, str, SourceFile]) -> tuple[bytes | None, str, str]:
        return load_image_bytes(entry[2].url, storage_options)

    chunk_size = max(1, workers * _CHUNK_PER_WORKER)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(entries), chunk_size):
            chunk = entries[start:start + chunk_size]
            yield from zip(chunk, pool.map(load, chunk))
