"""Reading a finished audit back: its manifest and tables, for the report and the diff."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vog_ray import storage

SCORE_COLUMNS = (
    "key", "shard", "label", "label_true", "pred_last", "correct_last", "learned_at",
    "forgetting_events", "vog_raw", "vog", "vog_flag",
)


@dataclass
class Audit:
    """The outputs of one completed audit, as read back from its folder."""

    url: str
    manifest: dict[str, Any]
    scores: pa.Table
    class_stats: pa.Table | None
    errors: pa.Table | None


class AuditUnreadable(ValueError):
    """An audit folder whose manifest cannot be read."""


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON file through fsspec."""
    return json.loads(storage.read_bytes(url, storage_options))


def read_table(
    url: str, columns: tuple[str, ...] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table | None:
    """A parquet file's ``columns`` that exist (all when None); None when the file is missing."""
    fs, path = storage.filesystem(url, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = parquet.schema_arrow.names
        wanted = None if columns is None else [name for name in columns if name in present]
        return parquet.read(columns=wanted)


def load_audit(
    url: str, columns: tuple[str, ...] = SCORE_COLUMNS,
    storage_options: dict[str, Any] | None = None,
) -> Audit:
    """Read ``manifest.json`` and the tables of the audit at ``url``."""
    manifest_url = storage.join(url, "manifest.json")
    if not storage.exists(manifest_url, storage_options):
        raise FileNotFoundError(
            f"{manifest_url} is missing: the audit at {url} is not complete (the manifest is "
            "written last) or this is not an audit folder; finish it with `vog-ray score`"
        )
    try:
        manifest = read_json(manifest_url, storage_options)
    except ValueError as error:
        raise AuditUnreadable(
            f"{manifest_url} is not valid JSON ({error}); the audit at {url} is damaged: "
            "score it again into a new folder"
        ) from error
    outputs = manifest.get("outputs") or {}
    scores_url = storage.join(url, outputs.get("scores", "scores.parquet"))
    scores = read_table(scores_url, columns, storage_options)
    if scores is None or "key" not in scores.column_names:
        raise FileNotFoundError(
            f"{scores_url} is missing or has no 'key' column; rerun the audit into {url}"
        )
    return Audit(
        url=url,
        manifest=manifest,
        scores=scores,
        class_stats=read_table(
            storage.join(url, outputs.get("class_stats", "class_stats.parquet")),
            storage_options=storage_options,
        ),
        errors=read_table(storage.join(url, outputs.get("errors", "errors.parquet")),
                          storage_options=storage_options),
    )
