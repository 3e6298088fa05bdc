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
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import natsort

from .shard_sources import (
    HIDDEN,
    IMAGE_EXTENSIONS,
    INVALID_LABEL,
    KEY_COLLISION,
    MISSING_LABEL,
    NOT_AN_IMAGE,
    OUTSIDE_CLASS_FOLDER,
    TABLE_FORMATS,
    UNKNOWN_EXTENSION,
    UNREADABLE,
    BadFile,
    MakeShardsError,
    SourceFile,
    assign_keys,
    file_extension,
    list_source,
    load_entries,
    load_image_bytes,
    sample_key,
)
from .shard_writer import SHARD_GLOB, SHARD_NAME, ShardSink, prepare_output, write_json

__all__ = [
    "BAD_FILES_FILE", "CLASSES_FILE", "DEFAULT_SHARD_SIZE_BYTES", "HIDDEN", "IMAGE_EXTENSIONS",
    "INVALID_LABEL", "KEY_COLLISION", "MISSING_LABEL", "NOT_AN_IMAGE", "OUTSIDE_CLASS_FOLDER",
    "SHARD_GLOB", "SHARD_NAME", "TABLE_FORMATS", "UNKNOWN_EXTENSION", "UNREADABLE", "BadFile",
    "MakeShardsError", "ShardSink", "ShardSummary", "SourceFile", "assign_keys", "file_extension",
    "list_source", "load_image_bytes", "make_shards", "register", "run_make_shards", "sample_key",
]

logger = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
BAD_FILES_FILE = "bad_files.json"
DEFAULT_SHARD_SIZE_BYTES = 300 * 2**20


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
    prepare_output(out, overwrite, storage_options)
    sink = ShardSink(
        out, shard_size_bytes=shard_size_bytes, max_samples_per_shard=max_samples_per_shard,
        storage_options=storage_options,
    )
    counts = [0] * len(classes)
    loaded = load_entries(entries, workers, storage_options)
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
    classes_url = write_json(out, CLASSES_FILE, classes, storage_options)
    bad_url = write_json(out, BAD_FILES_FILE, [asdict(entry) for entry in bad], storage_options)
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
