"""The manifest: everything needed to rerun an audit and check it. Written last."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from typing import Any

from vog_ray import storage

FORMAT = 1
_PACKAGES = ("vog_ray", "torch", "torchvision", "ray", "webdataset", "numpy", "pyarrow", "fsspec")
OUTPUTS = {"scores": "scores.parquet", "class_stats": "class_stats.parquet",
           "errors": "errors.parquet"}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(config, plan, results, *, wall_time: float) -> dict[str, Any]:
    """The manifest of a finished audit; holds no storage options or credentials."""
    shards = [_shard_entry(r) for r in sorted(results, key=lambda r: r.url)]
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall_time, 3),
        "model": config.model,
        "num_classes": plan.num_classes,
        "checkpoints": [c.record for c in plan.checkpoints],
        "preprocessing": {"image_size": config.image_size, "mean": list(config.mean),
                          "std": list(config.std)},
        "options": {
            "label": config.label, "target": config.target, "channels": config.channels,
            "windows": {name: list(span) for name, span in plan.windows.items()},
            "batch_size": config.batch_size, "precision": config.precision,
            "compile": config.compile,
        },
        "fingerprint": plan.fingerprint,
        "shards": shards,
        "counts": _counts(shards, results),
        "class_names": _class_names(config),
        "outputs": dict(OUTPUTS),
        "versions": library_versions(),
        "config": config.to_dict(),
        "working_dir": os.getcwd(),
    }


def _shard_entry(result) -> dict[str, Any]:
    return {
        "url": result.url, "id": result.shard_id, "part": result.part, "read": result.read,
        "scored": result.scored, "failed": result.failed, "incomplete": result.incomplete,
        "duplicates": result.duplicates, "identity": result.identity,
        "errors": len(result.errors),
    }


def _counts(shards: list[dict[str, Any]], results) -> dict[str, int]:
    return {
        "shards": len(shards),
        "shards_incomplete": sum(s["incomplete"] for s in shards),
        "shards_unreadable": sum(
            1 for r in results if any(e["stage"] == "open" for e in r.errors)
        ),
        "read": sum(s["read"] for s in shards),
        "scored": sum(s["scored"] for s in shards),
        "failed": sum(s["failed"] for s in shards),
        "duplicate_keys": sum(s["duplicates"] for s in shards),
    }


def _class_names(config) -> list[str] | None:
    """``classes.json`` beside the first shard, when the shards were made with make-shards."""
    first = storage.expand_urls(config.data[:1], config.storage_options)[:1]
    if not first:
        return None
    url = storage.join(first[0].rsplit("/", 1)[0], "classes.json") if "/" in first[0] \
        else "classes.json"
    try:
        return json.loads(storage.read_bytes(url, config.storage_options))
    except (FileNotFoundError, OSError, ValueError):
        return None


def read_manifest(output: str, storage_options=None) -> dict[str, Any]:
    """The manifest of a finished audit; a missing one means the audit did not complete."""
    url = storage.join(output, "manifest.json")
    try:
        return json.loads(storage.read_bytes(url, storage_options))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{url} does not exist: the audit in {output} has not completed; rerun the same "
            "command to resume it"
        ) from error
