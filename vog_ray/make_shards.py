"""Convert an image folder tree or a ``path,label`` table into WebDataset tar shards.

Two kinds of source are understood:

* a folder with one sub-folder per class (``SRC/<class>/<...>/<file>.png``); class ids are the
  positions of the sub-folder names in sorted order, as torchvision's ``ImageFolder`` numbers them;
* a CSV or Parquet file with the columns ``path`` and ``label``; relative paths are read from the
  table's own folder, ``label`` holds class names or integer class ids.

Each sample is stored as its original image bytes under the file's lower-cased extension plus its
class id as ``cls``. The key is the source path without its extension, with the characters that
WebDataset cannot carry in a key (dots) replaced, so a later re-audit can find the same sample.
Files are taken in natural order and tar headers carry fixed metadata, so the same input gives
byte-identical shards. Every file that cannot be stored is listed in ``bad_files.json`` with its
reason; ``classes.json`` holds the class names, index = class id.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import fsspec
import natsort
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from webdataset import TarWriter

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "ppm")
TABLE_FORMATS: dict[str, str] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SHARD_NAME = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
CLASSES_FILE = "classes.json"
BAD_FILES_FILE = "bad_files.json"
DEFAULT_SHARD_SIZE_BYTES = 300 * 2**20

# Fixed tar metadata: together with the sorted file order it makes the shards reproducible.
_TAR_USER = "vog_ray"
_TAR_MODE = 0o444
_TAR_MTIME = 0.0
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE
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


@dataclass
class ShardSummary:
    """What one ``make_shards`` run wrote."""

    shards: list[str]
    samples: int
    bad_files: int
    classes: list[str]
    class_counts: list[int]
    bytes_written: int
    classes_url: str
    bad_files_url: str
    bad_reasons: dict[str, int] = field(default_factory=dict)


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


def _loaded(
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


# ---------------------------------------------------------------------------------------------
# Writing shards


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


def _prepare_output(out: str, overwrite: bool, storage_options: dict[str, Any] | None) -> None:
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


def _write_json(
    out: str, name: str, payload: Any, storage_options: dict[str, Any] | None
) -> str:
    url = f"{out.rstrip('/')}/{name}"
    with fsspec.open(url, "w", encoding="utf-8", **(storage_options or {})) as handle:
        json.dump(payload, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    return url


def _check_limits(shard_size_bytes: int, max_samples_per_shard: int | None, workers: int) -> None:
    if shard_size_bytes <= 0:
        raise MakeShardsError(f"shard_size_bytes must be positive, got {shard_size_bytes}.")
    if max_samples_per_shard is not None and max_samples_per_shard <= 0:
        raise MakeShardsError(
            f"max_samples_per_shard must be positive or None, got {max_samples_per_shard}."
        )
    if workers <= 0:
        raise MakeShardsError(f"workers must be positive, got {workers}.")


def make_shards(
    src: str,
    out: str,
    *,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    max_samples_per_shard: int | None = None,
    overwrite: bool = False,
    workers: int = 4,
    storage_options: dict[str, Any] | None = None,
) -> ShardSummary:
    """Write the images of ``src`` as WebDataset shards, ``classes.json`` and ``bad_files.json``.

    ``src`` and ``out`` are local paths or fsspec URLs. A shard is closed before it would exceed
    ``shard_size_bytes`` on disk (a single larger sample gets a shard of its own) or when it holds
    ``max_samples_per_shard`` samples. ``workers`` files are read and decoded at a time;
    ``storage_options`` go to every fsspec filesystem (e.g. an S3 endpoint). Raises
    ``MakeShardsError`` when the source cannot be read as either layout, when ``out`` already
    holds shards and ``overwrite`` is false, or when no file could be stored (``bad_files.json``
    is written first and says why).
    """
    _check_limits(shard_size_bytes, max_samples_per_shard, workers)
    files, classes, bad = list_source(src, storage_options)
    entries, key_bad = assign_keys(files)
    bad.extend(key_bad)
    _prepare_output(out, overwrite, storage_options)
    sink = ShardSink(
        out, shard_size_bytes=shard_size_bytes, max_samples_per_shard=max_samples_per_shard,
        storage_options=storage_options,
    )
    counts = [0] * len(classes)
    loaded = _loaded(entries, workers, storage_options)
    try:
        for (key, extension, item), (data, reason, message) in loaded:
            if data is None:
                bad.append(BadFile(item.relpath, reason, message))
                continue
            sink.write(key, extension, data, item.label)
            counts[item.label] += 1
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return _finish(src, out, sink, classes, counts, bad, storage_options)


def _finish(
    src: str, out: str, sink: ShardSink, classes: list[str], counts: list[int],
    bad: list[BadFile], storage_options: dict[str, Any] | None,
) -> ShardSummary:
    bad = natsort.natsorted(bad, key=lambda entry: entry.path)
    reasons: dict[str, int] = {}
    for entry in bad:
        reasons[entry.reason] = reasons.get(entry.reason, 0) + 1
    classes_url = _write_json(out, CLASSES_FILE, classes, storage_options)
    bad_url = _write_json(out, BAD_FILES_FILE, [asdict(entry) for entry in bad], storage_options)
    for name, count in zip(classes, counts):
        if count == 0:
            logger.warning("class %r has no stored image", name)
    if not sink.shards:
        raise MakeShardsError(
            f"{src}: no image could be stored ({len(bad)} file(s) rejected); see {bad_url}."
        )
    return ShardSummary(
        shards=sink.shards, samples=sum(counts), bad_files=len(bad), classes=classes,
        class_counts=counts, bytes_written=sink.bytes_written, classes_url=classes_url,
        bad_files_url=bad_url, bad_reasons=reasons,
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``make-shards`` subcommand."""
    parser = subparsers.add_parser(
        "make-shards",
        help="convert an image folder or a path,label table into WebDataset shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="class-folder tree, or .csv/.parquet table")
    parser.add_argument("out", metavar="OUT", help="output folder (local path or fsspec URL)")
    parser.add_argument(
        "--shard-size-mb", type=_positive(float), default=DEFAULT_SHARD_SIZE_BYTES / 2**20,
        help="largest shard size in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--max-samples", type=_positive(int), default=None,
        help="largest number of samples per shard (default: no limit)",
    )
    parser.add_argument(
        "--workers", type=_positive(int), default=4,
        help="files read and decoded at a time (default: %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    parser.add_argument(
        "--storage-options", type=_json_object, default={},
        help="JSON of fsspec storage options for SRC and OUT (e.g. an S3 endpoint)",
    )
    parser.set_defaults(func=run_make_shards)


def run_make_shards(args: argparse.Namespace) -> int:
    """Run ``make-shards`` from parsed arguments; 0 on success, 2 on a usage problem."""
    try:
        summary = make_shards(
            args.src, args.out, shard_size_bytes=int(args.shard_size_mb * 2**20),
            max_samples_per_shard=args.max_samples, overwrite=args.overwrite,
            workers=args.workers, storage_options=args.storage_options,
        )
    except MakeShardsError as error:
        logger.error("%s", error)
        return 2
    logger.info(
        "wrote %d samples of %d classes into %d shard(s), %.1f MiB, in %s",
        summary.samples, len(summary.classes), len(summary.shards),
        summary.bytes_written / 2**20, args.out,
    )
    if summary.bad_files:
        logger.warning(
            "%d file(s) not stored %s; see %s",
            summary.bad_files, summary.bad_reasons, summary.bad_files_url,
        )
    return 0
