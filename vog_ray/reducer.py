"""Merge per-shard statistics exactly, normalize within class, write the audit's tables."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vog_ray import storage
from vog_ray.plan import COMMITS, PARTS
from vog_ray.rows import raw_column
from vog_ray.stats import ClassStats, merge_all, normalization_flag, normalize
from vog_ray.worker import ShardResult

logger = logging.getLogger(__name__)

ERROR_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("message", pa.string()),
])


def merged_class_stats(
    results: list[ShardResult], windows: dict[str, tuple[int, int]]
) -> dict[str, dict[int, ClassStats]]:
    """Exact per-class statistics of every window, merged in shard-URL order.

    Fixing the order makes the result independent of which actor scored which shard and when.
    """
    ordered = sorted(results, key=lambda r: r.url)
    return {
        window: merge_all([
            {label: ClassStats.from_list(v) for label, v in r.class_stats.get(window, {}).items()}
            for r in ordered
        ])
        for window in windows
    }


def class_stats_table(stats: dict[str, dict[int, ClassStats]]) -> pa.Table:
    rows = [
        {"window": window, "label": label, "count": s.count, "mean": s.mean,
         "std": s.std, "flag": normalization_flag(s)}
        for window, per_class in stats.items() for label, s in sorted(per_class.items())
    ]
    schema = pa.schema([("window", pa.string()), ("label", pa.int64()), ("count", pa.int64()),
                        ("mean", pa.float64()), ("std", pa.float64()), ("flag", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def normalized_part(table: pa.Table, stats: dict[str, dict[int, ClassStats]]) -> pa.Table:
    """A part's rows with ``vog``, ``vog_abs`` and ``vog_flag`` for every window."""
    labels = table.column("label").to_numpy()
    for window, per_class in stats.items():
        suffix = "" if window == "all" else f"_{window}"
        vog, flags = normalize(table.column(raw_column(window)).to_numpy(), labels, per_class)
        missing = np.isnan(vog)
        table = table.append_column(f"vog{suffix}", pa.array(vog, pa.float64(), mask=missing))
        table = table.append_column(
            f"vog_abs{suffix}", pa.array(np.abs(vog), pa.float64(), mask=missing)
        )
        table = table.append_column(f"vog_flag{suffix}", pa.array(flags, pa.string()))
    return table


def write_scores(
    output: str,
    results: list[ShardResult],
    stats: dict[str, dict[int, ClassStats]],
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Stream every committed part into ``scores.parquet``, one row group per shard.

    Only one part is in memory at a time. Returns the number of rows written.
    """
    writer = None
    rows = 0
    with storage.open_for_write(storage.join(output, "scores.parquet"), storage_options) as out:
        for result in sorted(results, key=lambda r: r.url):
            if result.part is None:
                continue
            part = pq.read_table(io.BytesIO(
                storage.read_bytes(storage.join(output, result.part), storage_options)
            ))
            table = normalized_part(part, stats)
            writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd")
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:
            pq.write_table(pa.table({"key": pa.array([], pa.string())}), out)
        else:
            writer.close()
    return rows


def write_table(url: str, table: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(url, buffer.getvalue(), storage_options)


def write_errors(output: str, results: list[ShardResult], storage_options=None) -> int:
    rows = [error for r in sorted(results, key=lambda r: r.url) for error in r.errors]
    write_table(storage.join(output, "errors.parquet"),
                pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), storage_options)
    return len(rows)


def remove_leftovers(output: str, results: list[ShardResult], storage_options=None) -> int:
    """Delete part files no commit record names, and half-written temporary files.

    Lost workers, retried shards and a killed driver leave such files; readers never trust
    them. Returns the number of files removed.
    """
    named = {r.part.rsplit("/", 1)[-1] for r in results if r.part}
    leftovers = [
        storage.join(output, PARTS, name)
        for name in storage.list_dir(storage.join(output, PARTS), storage_options)
        if name not in named
    ] + [
        storage.join(output, COMMITS, name)
        for name in storage.list_dir(storage.join(output, COMMITS), storage_options)
        if ".tmp-" in name
    ]
    for url in leftovers:
        storage.remove(url, storage_options)
    if leftovers:
        logger.info("removed %d files that no commit record names", len(leftovers))
    return len(leftovers)


def write_json(url: str, value: dict[str, Any], storage_options=None) -> None:
    data = json.dumps(value, indent=2, sort_keys=False, default=str).encode()
    storage.write_bytes(url, data, storage_options)
