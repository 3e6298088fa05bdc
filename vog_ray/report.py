"""A static HTML report of a finished audit: summary, extreme examples per class, diagnostics.

Everything lands under ``OUTPUT/report/``: ``index.html``, the PNG files it shows and
``review_queue.csv``. Links are relative, so the folder opens from a disk or an object store
without a server. Images are read back from the shards named in ``scores.parquet``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from typing import Any

import numpy as np
import pyarrow as pa
from jinja2 import Environment, PackageLoader, StrictUndefined

from vog_ray import report_figures, storage
from vog_ray.audit_files import Audit, load_audit
from vog_ray.config import IMAGE_EXTENSIONS
from vog_ray.report_figures import floats, grid_image, png_bytes
from vog_ray.report_images import fetch_images

logger = logging.getLogger(__name__)

REVIEW_QUEUE_COLUMNS = ("rank", "shard", "key", "label", "pred_last", "vog", "vog_raw")


# The per-class extremes.


def class_extremes(
    scores: pa.Table, per_class: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per label: rows of the ``per_class`` lowest and highest ``vog``, most extreme first."""
    labels = floats(scores, "label")
    vog = floats(scores, "vog")
    extremes = {}
    for label in np.unique(labels[~np.isnan(labels)]):
        rows = np.flatnonzero((labels == label) & ~np.isnan(vog))
        ordered = rows[np.argsort(vog[rows], kind="stable")]
        extremes[int(label)] = (ordered[:per_class], ordered[::-1][:per_class])
    return extremes


def example_rows(scores: pa.Table, indices: np.ndarray) -> list[dict[str, Any]]:
    """The rows at ``indices`` as dicts of plain Python values."""
    taken = scores.take(pa.array(indices, pa.int64()))
    return taken.to_pylist()


def _class_section(
    report_url: str, label: int, rows: tuple[list[dict], list[dict]], images: dict,
    names: list | None, storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    low, high = rows
    for side, examples in (("low", low), ("high", high)):
        for position, example in enumerate(examples):
            image = images.get((example["shard"], example["key"]))
            example["img"] = None
            if image is not None:
                example["img"] = f"img/c{label}-{side}-{position}.png"
                storage.write_bytes(storage.join(report_url, example["img"]),
                                    png_bytes(image), storage_options)
    grid = grid_image([images.get((e["shard"], e["key"])) for e in low],
                      [images.get((e["shard"], e["key"])) for e in high])
    grid_path = f"img/c{label}-grid.png"
    storage.write_bytes(storage.join(report_url, grid_path), png_bytes(grid), storage_options)
    return {"label": label, "name": class_name(label, names), "low": low, "high": high,
            "grid": grid_path}


def class_name(label: int, names: list | None) -> str | None:
    """The class's name from the manifest, unless it only repeats the label."""
    name = names[label] if names and 0 <= label < len(names) else None
    return None if name is None or str(name) == str(label) else str(name)


def write_class_sections(
    report_url: str, audit: Audit, per_class: int,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Read the extreme examples' images back from their shards and write their PNG files."""
    extremes = class_extremes(audit.scores, per_class)
    rows = {label: (example_rows(audit.scores, low), example_rows(audit.scores, high))
            for label, (low, high) in extremes.items()}
    wanted: dict[str, set[str]] = {}
    for low, high in rows.values():
        for example in low + high:
            wanted.setdefault(example["shard"], set()).add(example["key"])
    images = fetch_images(wanted, image_extensions(audit.manifest), storage_options)
    names = audit.manifest.get("class_names")
    return [_class_section(report_url, label, rows[label], images, names, storage_options)
            for label in rows]


def image_extensions(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The image keys the audit decoded, in its order of preference."""
    for section in ("options", "config"):
        keys = (manifest.get(section) or {}).get("image_keys")
        if keys:
            return tuple(str(key).lower() for key in keys)
    return IMAGE_EXTENSIONS


# Review queue, summary and page.


def write_review_queue(
    report_url: str, scores: pa.Table, size: int,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The ``size`` highest-``vog`` examples across classes, as ``review_queue.csv``."""
    vog = floats(scores, "vog")
    rows = np.flatnonzero(~np.isnan(vog))
    top = rows[np.argsort(-vog[rows], kind="stable")][:size]
    queue = example_rows(scores, top)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REVIEW_QUEUE_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for rank, example in enumerate(queue, start=1):
        example["rank"] = rank
        writer.writerow(example)
    storage.write_bytes(storage.join(report_url, "review_queue.csv"), buffer.getvalue().encode(),
                        storage_options)
    return queue


def error_summary(errors: pa.Table | None) -> list[dict[str, Any]]:
    """Count of failed samples per (stage, reason), most frequent first."""
    if errors is None or errors.num_rows == 0:
        return []
    counts: dict[tuple, int] = {}
    columns = [errors.column(name).to_pylist() if name in errors.column_names
               else [None] * errors.num_rows for name in ("stage", "reason")]
    for stage, reason in zip(*columns, strict=True):
        counts[(stage, reason)] = counts.get((stage, reason), 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return [{"stage": stage, "reason": reason, "count": count}
            for (stage, reason), count in ordered]


def summary(audit: Audit) -> dict[str, Any]:
    """What the page's summary shows, all from ``manifest.json`` and ``errors.parquet``."""
    manifest = audit.manifest
    options = manifest.get("options") or {}
    return {
        "created": manifest.get("created"),
        "model": manifest.get("model"),
        "num_classes": manifest.get("num_classes"),
        "wall_time_s": manifest.get("wall_time_s"),
        "counts": manifest.get("counts") or {},
        "shards": manifest.get("shards") or [],
        "checkpoints": manifest.get("checkpoints") or [],
        "options": {name: _shown(value) for name, value in options.items()},
        "preprocessing": {k: _shown(v) for k, v in (manifest.get("preprocessing") or {}).items()},
        "versions": manifest.get("versions") or {},
        "errors": error_summary(audit.errors),
        "has_errors_file": audit.errors is not None,
    }


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "\N{EN DASH}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "\N{EN DASH}"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def render(context: dict[str, Any]) -> str:
    """The page from ``templates/report.html.j2``, with HTML escaping on."""
    environment = Environment(loader=PackageLoader("vog_ray", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["number"] = _number
    environment.filters["duration"] = _duration
    return environment.get_template("report.html.j2").render(**context)


def write_report(output_url: str, *, per_class: int = 8, baseline: str | None = None,
                 review_size: int = 200, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``OUTPUT/report/`` for the audit at ``output_url``; return the index.html URL.

    ``per_class`` lowest and highest examples are shown per class, ``review_size`` rows go to
    the review queue, and ``baseline`` (an older audit's folder) adds a comparison section.
    ``storage_options`` (fsspec's, e.g. an S3 endpoint and keys) serve every read and write:
    the audit, its shards, the baseline and the report itself.
    """
    if per_class < 1 or review_size < 1:
        raise ValueError(f"per_class and review_size must be at least 1; got {per_class} and "
                         f"{review_size}")
    audit = load_audit(output_url, storage_options=storage_options)
    report_url = storage.join(output_url, "report")
    storage.remove(report_url, storage_options)
    context = {
        "title": audit.manifest.get("model") or output_url,
        "summary": summary(audit),
        "classes": write_class_sections(report_url, audit, per_class, storage_options),
        "per_class": per_class,
        "figures": report_figures.write_figures(report_url, audit.scores, storage_options),
        "queue": write_review_queue(report_url, audit.scores, review_size, storage_options)[:25],
        "queue_size": review_size,
        "diff": (_diff_section(baseline, output_url, report_url, storage_options)
                 if baseline else None),
        "baseline": baseline,
    }
    index_url = storage.join(report_url, "index.html")
    storage.write_bytes(index_url, render(context).encode("utf-8"), storage_options)
    logger.info("report of %s written to %s", output_url, index_url)
    return index_url


def _diff_section(baseline: str, output_url: str, report_url: str,
                  storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    from vog_ray.diff import diff_audits  # the diff module reads audits through this one

    return diff_audits(baseline, output_url, storage.join(report_url, "diff"),
                       storage_options=storage_options)


def register_report(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report OUTPUT [--per-class N] [--baseline OLD] [--storage-options JSON]``."""
    parser = subparsers.add_parser(
        "report", help="write a static HTML report of a finished audit",
        description="Write OUTPUT/report/index.html with the audit's summary, the lowest and "
                    "highest VoG examples of each class, diagnostics and a review queue.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the audit's output folder or URL")
    parser.add_argument("--per-class", type=int, default=8, metavar="N",
                        help="lowest and highest examples shown per class (default 8)")
    parser.add_argument("--baseline", metavar="OLD", default=None,
                        help="an older audit of the same data: adds a comparison section")
    parser.add_argument("--review-size", type=int, default=200, metavar="N",
                        help="rows in review_queue.csv (default 200)")
    parser.add_argument("--storage-options", default="{}", metavar="JSON",
                        help="JSON of fsspec storage options (e.g. an S3 endpoint); never "
                             "written to outputs")
    parser.set_defaults(func=_run_report)
    return parser


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The hook :mod:`vog_ray.cli` calls on each module of ``COMMAND_MODULES``."""
    return register_report(subparsers)


def _run_report(args: argparse.Namespace) -> int:
    url = write_report(args.output, per_class=args.per_class, baseline=args.baseline,
                       review_size=args.review_size,
                       storage_options=json.loads(args.storage_options))
    sys.stdout.write(url + "\n")
    return 0
