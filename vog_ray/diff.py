"""Compare two audits of the same data: what was added or removed and how the VoG ranking moved.

Examples are matched on ``key`` alone when every key is unique within each audit, so that shards
renamed or moved between the audits still match. When some key repeats, examples are matched
on ``(shard, key)`` instead, and a repeat within one shard by its order of appearance; renamed
shards then show as removed and added.

Percentile ranks are taken within each audit over its examples with a ``vog``:
``pct = (rank - 0.5) / n`` with ties sharing their mean rank, so ``pct`` lies in (0, 1). An
example is in the top decile when ``pct >= 0.9``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vog_ray import storage
from vog_ray.audit_files import Audit, load_audit
from vog_ray.report_figures import floats

logger = logging.getLogger(__name__)

TOP_DECILE = 0.9
LISTED = 20
DIFF_COLUMNS = ("key", "shard", "label", "vog", "vog_raw")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]] if len(values) else np.zeros(0, bool)
    first = np.flatnonzero(starts)
    ends = np.r_[first[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((first + 1 + ends) / 2)[np.cumsum(starts) - 1]
    return ranks


def percentile_ranks(vog: np.ndarray) -> np.ndarray:
    """``(rank - 0.5) / n`` over the non-NaN values; NaN stays NaN."""
    pct = np.full(len(vog), np.nan)
    valid = ~np.isnan(vog)
    if valid.any():
        pct[valid] = (average_ranks(vog[valid]) - 0.5) / valid.sum()
    return pct


def spearman(old: np.ndarray, new: np.ndarray) -> float | None:
    """Spearman rank correlation of two paired samples; None below 2 pairs or without spread."""
    if len(old) < 2:
        return None
    old_ranks, new_ranks = average_ranks(old), average_ranks(new)
    if old_ranks.std() == 0 or new_ranks.std() == 0:
        return None
    return float(np.corrcoef(old_ranks, new_ranks)[0, 1])


def match_ids(keys: list[str], shards: list[str], on: str) -> list[Any]:
    """The identity of each row: its key, or (shard, key, n-th repeat of that pair)."""
    if on == "key":
        return list(keys)
    seen: dict[tuple[str, str], int] = {}
    ids = []
    for shard, key in zip(shards, keys, strict=True):
        repeat = seen.get((shard, key), 0)
        seen[(shard, key)] = repeat + 1
        ids.append((shard, key, repeat))
    return ids


def match_rows(old: pa.Table, new: pa.Table) -> tuple[str, np.ndarray, np.ndarray]:
    """How rows were matched, and paired row indices (-1 where one side has none).

    Pairs come in the old audit's order, then the new audit's added rows in its order.
    """
    old_keys, new_keys = old.column("key").to_pylist(), new.column("key").to_pylist()
    unique = len(set(old_keys)) == len(old_keys) and len(set(new_keys)) == len(new_keys)
    on = "key" if unique else "shard_key"
    old_ids = match_ids(old_keys, old.column("shard").to_pylist(), on)
    new_ids = match_ids(new_keys, new.column("shard").to_pylist(), on)
    new_index = {identity: row for row, identity in enumerate(new_ids)}
    old_rows, new_rows = list(range(len(old_ids))), [new_index.get(i, -1) for i in old_ids]
    matched = set(new_rows)
    added = [row for row in range(len(new_ids)) if row not in matched]
    old_paired = np.array(old_rows + [-1] * len(added), np.int64)
    return on, old_paired, np.array(new_rows + added, np.int64)


def _side(table: pa.Table, rows: np.ndarray, name: str) -> pa.Array:
    """Column ``name`` of ``table`` at ``rows``, null where the row is -1."""
    if name not in table.column_names:
        return pa.nulls(len(rows))
    present = rows >= 0
    taken = table.column(name).take(pa.array(np.where(present, rows, 0)))
    return pc.if_else(pa.array(present), taken, pa.scalar(None, taken.type))


def _values(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.full(len(rows), np.nan)
    out[rows >= 0] = values[rows[rows >= 0]]
    return out


def diff_table(old: pa.Table, new: pa.Table, old_rows: np.ndarray,
               new_rows: np.ndarray) -> pa.Table:
    """One row per matched identity: both sides' values, percentile ranks and top-decile moves."""
    pct_old = _values(percentile_ranks(floats(old, "vog")), old_rows)
    pct_new = _values(percentile_ranks(floats(new, "vog")), new_rows)
    top_old, top_new = pct_old >= TOP_DECILE, pct_new >= TOP_DECILE
    status = np.where(old_rows < 0, "added", np.where(new_rows < 0, "removed", "common"))
    key = pc.coalesce(_side(new, new_rows, "key"), _side(old, old_rows, "key"))
    columns = {"key": key, "status": pa.array(status)}
    for name in ("shard", "label", "vog", "vog_raw"):
        columns[f"{name}_old"] = _side(old, old_rows, name)
        columns[f"{name}_new"] = _side(new, new_rows, name)
    columns.update({
        "pct_old": pa.array(pct_old, mask=np.isnan(pct_old)),
        "pct_new": pa.array(pct_new, mask=np.isnan(pct_new)),
        "pct_change": pa.array(pct_new - pct_old, mask=np.isnan(pct_new - pct_old)),
        "in_top_old": pa.array(top_old), "in_top_new": pa.array(top_new),
        "entered_top": pa.array(top_new & ~top_old), "left_top": pa.array(top_old & ~top_new),
    })
    return pa.table(columns)


def _listed(table: pa.Table, mask: np.ndarray, order: np.ndarray | None = None) -> list[dict]:
    rows = np.flatnonzero(mask)
    if order is not None:
        rows = rows[np.argsort(order[rows], kind="stable")]
    shown = ("key", "status", "shard_old", "shard_new", "label_old", "label_new", "vog_old",
             "vog_new", "pct_old", "pct_new", "pct_change")
    return _clean(table.select(shown).take(pa.array(rows[:LISTED], pa.int64())).to_pylist())


def _clean(value: Any) -> Any:
    """NaN and infinities as None, recursively, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def class_stats_side_by_side(old: pa.Table | None, new: pa.Table | None) -> list[dict]:
    """Rows of both ``class_stats.parquet`` files joined on (window, label): ``<stat>_old/_new``."""
    if old is None or new is None:
        return []
    keys = [name for name in ("window", "label") if name in old.column_names
            and name in new.column_names]
    if not keys:
        return []
    merged: dict[tuple, dict[str, Any]] = {}
    for suffix, table in (("_old", old), ("_new", new)):
        for row in table.to_pylist():
            identity = tuple(row.pop(name) for name in keys)
            entry = merged.setdefault(identity, dict(zip(keys, identity, strict=True)))
            entry.update({f"{name}{suffix}": value for name, value in row.items()})
    ordered = sorted(merged.items(), key=lambda item: [(v is None, v) for v in item[0]])
    return _clean([entry for _, entry in ordered])


def summarize(table: pa.Table, on: str, old: Audit, new: Audit) -> dict[str, Any]:
    """The JSON summary of a diff table."""
    status = np.asarray(table.column("status").to_pylist())
    common = status == "common"
    vog_old, vog_new = floats(table, "vog_old"), floats(table, "vog_new")
    ranked = common & ~np.isnan(vog_old) & ~np.isnan(vog_new)
    change = floats(table, "pct_change")
    entered = table.column("entered_top").to_numpy(zero_copy_only=False)
    left = table.column("left_top").to_numpy(zero_copy_only=False)
    stayed = table.column("in_top_old").to_numpy(zero_copy_only=False) & ~left
    labels_old, labels_new = floats(table, "label_old"), floats(table, "label_new")
    return {
        "old": old.url, "new": new.url, "match_on": on,
        "counts": {"old": old.scores.num_rows, "new": new.scores.num_rows,
                   "common": int(common.sum()), "added": int((status == "added").sum()),
                   "removed": int((status == "removed").sum()),
                   "label_changed": int((common & (labels_old != labels_new)).sum())},
        "spearman": spearman(vog_old[ranked], vog_new[ranked]), "spearman_pairs": int(ranked.sum()),
        "top_decile": {"entered": int(entered.sum()), "left": int(left.sum()),
                       "stayed": int(stayed.sum())},
        "movers": _listed(table, ranked, -np.abs(np.nan_to_num(change))),
        "entered_top": _listed(table, entered, -np.nan_to_num(floats(table, "pct_new"))),
        "left_top": _listed(table, left, -np.nan_to_num(floats(table, "pct_old"))),
        "added": _listed(table, status == "added"),
        "removed": _listed(table, status == "removed"),
        "class_stats": class_stats_side_by_side(old.class_stats, new.class_stats),
        "outputs": {},
    }


def diff_audits(old_url: str, new_url: str, out_url: str | None = None, *,
                storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare the audit at ``old_url`` with the one at ``new_url``; return the summary.

    With ``out_url``, ``diff.parquet`` (one row per matched example) and ``diff_summary.json``
    are written there. ``storage_options`` (fsspec's, e.g. an S3 endpoint and keys) serve every
    read and write.
    """
    old = load_audit(old_url, DIFF_COLUMNS, storage_options)
    new = load_audit(new_url, DIFF_COLUMNS, storage_options)
    for audit in (old, new):
        if "shard" not in audit.scores.column_names:
            raise ValueError(f"{audit.url}/scores.parquet has no 'shard' column; rerun that audit")
    on, old_rows, new_rows = match_rows(old.scores, new.scores)
    table = diff_table(old.scores, new.scores, old_rows, new_rows)
    result = summarize(table, on, old, new)
    if out_url is not None:
        result["outputs"] = write_diff(out_url, table, result, storage_options)
        logger.info("diff of %s and %s written to %s", old_url, new_url, out_url)
    return result


def write_diff(out_url: str, table: pa.Table, result: dict[str, Any],
               storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``diff.parquet`` and ``diff_summary.json`` under ``out_url``; return their names."""
    outputs = {"diff": "diff.parquet", "summary": "diff_summary.json"}
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(storage.join(out_url, outputs["diff"]), buffer.getvalue(), storage_options)
    summary = json.dumps({**result, "outputs": outputs}, indent=2).encode()
    storage.write_bytes(storage.join(out_url, outputs["summary"]), summary, storage_options)
    return outputs


def register_diff(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``diff OLD NEW [--output DIR] [--storage-options JSON]`` to the command line."""
    parser = subparsers.add_parser(
        "diff", help="compare two audits of the same data",
        description="Print what was added or removed between two audits and how the VoG "
                    "ranking moved; with --output, also write diff.parquet and diff_summary.json.",
    )
    parser.add_argument("old", metavar="OLD", help="the earlier audit's output folder or URL")
    parser.add_argument("new", metavar="NEW", help="the later audit's output folder or URL")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help="folder or URL to write diff.parquet and diff_summary.json to")
    parser.add_argument("--storage-options", default="{}", metavar="JSON",
                        help="JSON of fsspec storage options (e.g. an S3 endpoint); never "
                             "written to outputs")
    parser.set_defaults(func=_run_diff)
    return parser


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The hook :mod:`vog_ray.cli` calls on each module of ``COMMAND_MODULES``."""
    return register_diff(subparsers)


def _run_diff(args: argparse.Namespace) -> int:
    result = diff_audits(args.old, args.new, args.output,
                         storage_options=json.loads(args.storage_options))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0
