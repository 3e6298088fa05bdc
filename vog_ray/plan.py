"""Which shards an audit covers, which are already committed, and the run's fingerprint check."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from vog_ray import storage

logger = logging.getLogger(__name__)

COMMITS = "commits"
PARTS = "parts"


class ResumeRefused(RuntimeError):
    """The output holds an audit with another configuration or checkpoint list."""


def shard_id(url: str) -> str:
    """Stable identity of a shard: 16 hex digits of the SHA-1 of its URL."""
    return hashlib.sha1(url.encode()).hexdigest()[:16]


def pending(shard_urls: list[str], committed: dict[str, dict[str, Any]]) -> list[str]:
    """Shards without a commit record, in the order given."""
    return [url for url in shard_urls if shard_id(url) not in committed]


def read_commits(output: str, shard_urls: list[str], storage_options=None) -> dict[str, dict]:
    """Commit records under ``OUTPUT/commits`` that a resumed run can reuse, by shard id.

    A record is left out, so that its shard is scored again, when it cannot be parsed, when its
    part file is gone, or when its shard could not be read whole (missing, empty or cut short):
    the shard may have been fixed since.
    """
    wanted = {shard_id(url) for url in shard_urls}
    parts = set(storage.list_dir(storage.join(output, PARTS), storage_options))
    records = {}
    for name in storage.list_dir(storage.join(output, COMMITS), storage_options):
        ident = name.removesuffix(".json")
        if not name.endswith(".json") or ident not in wanted:
            continue
        record = _read_record(storage.join(output, COMMITS, name), storage_options)
        problem = "its commit record cannot be parsed" if record is None \
            else reuse_problem(record, parts)
        if problem:
            logger.warning("shard %s is scored again: %s", ident, problem)
            continue
        records[ident] = record
    return records


def reuse_problem(record: dict[str, Any], parts: set[str]) -> str | None:
    """Why a commit record cannot be reused, given the names of the part files present."""
    shard_errors = [e["reason"] for e in record.get("errors", []) if e.get("key") is None]
    if shard_errors:
        return f"{record.get('url')} was not read whole before ({', '.join(shard_errors)})"
    part = record.get("part")
    if part and part.rsplit("/", 1)[-1] not in parts:
        return f"its part file {part} is missing"
    return None


def _read_record(url: str, storage_options) -> dict[str, Any] | None:
    try:
        record = json.loads(storage.read_bytes(url, storage_options))
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "shard_id" in record else None


def run_record(config, checkpoints) -> dict[str, Any]:
    """The content of ``run.json``: the fingerprint, the configuration and the checkpoints.

    ``config`` is a :class:`~vog_ray.config.ScoreConfig`, ``checkpoints`` the read
    :class:`~vog_ray.checkpoints.Checkpoint` list in checkpoint order.
    """
    return {"fingerprint": config.fingerprint([c.sha256 for c in checkpoints]),
            "config": config.to_dict(), "checkpoints": [c.record for c in checkpoints]}


def prepare_output(output: str, run: dict[str, Any], overwrite: bool, storage_options=None) -> bool:
    """Check ``run.json`` against this run; start afresh or resume. Returns True on resume.

    A different fingerprint (options or checkpoints) is refused unless ``overwrite``.
    """
    run_url = storage.join(output, "run.json")
    previous = None
    if storage.exists(run_url, storage_options):
        previous = json.loads(storage.read_bytes(run_url, storage_options))
    if previous is not None and previous.get("fingerprint") == run["fingerprint"] and not overwrite:
        logger.info("resuming the audit in %s", output)
        return True
    if previous is not None and not overwrite:
        raise ResumeRefused(
            f"{output} holds an audit with another configuration or checkpoint list "
            f"(fingerprint {previous.get('fingerprint', '?')[:12]} vs {run['fingerprint'][:12]}); "
            "choose another --output, or pass --overwrite to replace it"
        )
    for name in (COMMITS, PARTS, "manifest.json", "scores.parquet", "class_stats.parquet",
                 "errors.parquet", "run.json"):
        storage.remove(storage.join(output, name), storage_options)
    storage.write_bytes(run_url, json.dumps(run, indent=2).encode(), storage_options)
    return False
