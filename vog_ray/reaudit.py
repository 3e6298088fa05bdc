"""Re-audits: each run is a new dated audit under one root, reusing the shards that did not change.

Layout under ``ROOT``::

    latest                  {"audit": "20261203T030002Z", ...}: the last completed audit
    20261126T030001Z/       one audit (see docs/output-layout.md)
    20261203T030002Z/       the next one, with diff/ against the one before

A shard's part file and commit record are copied from the previous audit when the shard's
identity (size, plus ETag, checksum or mtime) is the one that audit recorded, and every setting
that changes a shard's rows is the same: checkpoint contents and order, model, preprocessing and
scoring options. The driver then resumes the new audit from those commit records, scores the
other shards, and normalizes within class over all of them. ``latest`` moves only once the new
audit's manifest is written, so a run that fails leaves it on the last complete audit.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from typing import Any

from vog_ray import storage
from vog_ray.checkpoints import read_checkpoints, resolve_checkpoint_urls
from vog_ray.commands import add_score_arguments, config_from_args
from vog_ray.config import ConfigError, ScoreConfig
from vog_ray.manifest import read_manifest
from vog_ray.plan import COMMITS, run_record

logger = logging.getLogger(__name__)

LATEST = "latest"
DIFF = "diff"
# Settings that change no row of a shard: the output folder, and the --data and --checkpoints
# patterns (checkpoints enter through their contents, in order).
_NOT_PER_SHARD = {"output": "", "data": ["-"], "checkpoints": ["-"]}


def audit_name(root: str, now: datetime.datetime, storage_options=None) -> str:
    """``YYYYMMDDTHHMMSSZ`` of ``now`` in UTC, with ``-2``, ``-3``... if that folder exists."""
    base = now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name, number = base, 1
    while storage.exists(storage.join(root, name), storage_options):
        number += 1
        name = f"{base}-{number}"
    return name


def read_latest(root: str, storage_options=None) -> dict[str, Any] | None:
    """The ``ROOT/latest`` pointer, or None before the first audit."""
    url = storage.join(root, LATEST)
    if not storage.exists(url, storage_options):
        return None
    try:
        pointer = json.loads(storage.read_bytes(url, storage_options))
        name = pointer["audit"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{url} should be JSON like {{\"audit\": \"20261203T030002Z\"}}; fix it, or delete it "
            "to score every shard afresh"
        ) from error
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{url} names {name!r}, not a folder directly under {root}; fix it")
    return pointer


def write_latest(root: str, name: str, manifest: dict[str, Any], storage_options=None) -> None:
    """Point ``ROOT/latest`` at the completed audit ``ROOT/name``."""
    pointer = {"audit": name, "created": manifest["created"],
               "fingerprint": manifest["fingerprint"], "counts": manifest["counts"]}
    storage.write_bytes(storage.join(root, LATEST), json.dumps(pointer, indent=2).encode(),
                        storage_options)


def shard_fingerprint(config_values: dict[str, Any], checkpoint_hashes: list[str]) -> str:
    """Hash of every setting that changes a shard's rows, from a ``run.json``-style config.

    The run fingerprint also covers the output folder and the --data and --checkpoints patterns,
    so it differs between any two dated audits; those are left out here.
    """
    known = {f.name for f in dataclasses.fields(ScoreConfig)}
    values = {name: value for name, value in config_values.items() if name in known}
    values.update(_NOT_PER_SHARD)
    return ScoreConfig(**values).fingerprint(checkpoint_hashes)


def reusable_shards(
    shards: list[str], previous: list[dict[str, Any]], identities: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Manifest entries of the previous audit whose shard is listed now and is unchanged.

    ``identities`` maps a shard URL to its identity now; a shard missing from it, or without a
    recorded identity, is scored again.
    """
    by_url = {entry["url"]: entry for entry in previous}
    return [
        by_url[url] for url in shards
        if url in by_url and by_url[url].get("identity")
        and identities.get(url) == by_url[url]["identity"]
    ]


def current_identities(urls: list[str], storage_options=None) -> dict[str, dict[str, Any]]:
    """Identity of each shard that exists now; a missing one is left for the driver to report."""
    identities = {}
    for url in urls:
        try:
            identities[url] = storage.file_identity(url, storage_options)
        except (FileNotFoundError, OSError) as error:
            logger.info("shard %s cannot be reused: %s", url, error)
    return identities


def _previous_audit(root: str, storage_options) -> tuple[str, dict[str, Any]] | None:
    pointer = read_latest(root, storage_options)
    if pointer is None:
        return None
    url = storage.join(root, pointer["audit"])
    try:
        return url, read_manifest(url, storage_options)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{storage.join(root, LATEST)} names {url}, which has no manifest.json; point it at "
            "a completed audit, or delete it to score every shard afresh"
        ) from error


def seed_from_previous(config: ScoreConfig, previous: tuple[str, dict] | None) -> list[dict]:
    """Write the new audit's ``run.json`` and copy the reusable shards' results into it.

    Returns the previous manifest's entries of the copied shards. Nothing is written when no
    shard can be reused: the driver then starts the audit afresh.
    """
    if previous is None:
        return []
    previous_url, manifest = previous
    options = config.storage_options
    checkpoints = read_checkpoints(resolve_checkpoint_urls(config.checkpoints, options), options)
    run = run_record(config, checkpoints)
    old_hashes = [c["sha256"] for c in manifest["checkpoints"]]
    if shard_fingerprint(run["config"], [c.sha256 for c in checkpoints]) != shard_fingerprint(
            manifest["config"], old_hashes):
        logger.info("checkpoints or scoring options differ from %s: every shard is scored again",
                    previous_url)
        return []
    shards = storage.expand_urls(config.data, options)
    known = {entry["url"] for entry in manifest["shards"]}
    identities = current_identities([url for url in shards if url in known], options)
    entries = reusable_shards(shards, manifest["shards"], identities)
    if entries:
        storage.write_bytes(storage.join(config.output, "run.json"),
                            json.dumps(run, indent=2).encode(), options)
        copy_shard_results(previous_url, config.output, entries, options)
    return entries


def copy_shard_results(source: str, target: str, entries: list[dict], storage_options=None) -> None:
    """Copy each shard's part file, then its commit record, so a commit never names a lost part."""
    for entry in entries:
        names = [entry["part"]] if entry.get("part") else []
        for name in [*names, f"{COMMITS}/{entry['id']}.json"]:
            url = storage.join(source, name)
            try:
                data = storage.read_bytes(url, storage_options)
            except FileNotFoundError as error:
                raise FileNotFoundError(
                    f"{url} is missing although {source}/manifest.json lists it; delete "
                    f"{source} or the root's {LATEST} file to score every shard afresh"
                ) from error
            storage.write_bytes(storage.join(target, name), data, storage_options)


def _diff(previous_url: str | None, url: str,
          storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Compare with the previous audit into ``url/diff`` when the diff module is installed."""
    if previous_url is None:
        return None
    try:
        from vog_ray.diff import diff_audits
    except ImportError:
        logger.info("vog_ray.diff is not available: no diff against %s written", previous_url)
        return None
    result = diff_audits(previous_url, url, storage.join(url, DIFF),
                         storage_options=storage_options)
    return {"output": storage.join(url, DIFF), "counts": result.get("counts")}


def reaudit(data: str | list[str], checkpoints: str | list[str], output_root: str,
            **score_options: Any) -> dict[str, Any]:
    """Audit ``data`` again under ``output_root/<UTC time>``; return the driver's summary.

    ``score_options`` are :class:`ScoreConfig` fields other than ``output``. The summary adds
    ``audit`` (the new folder's name), ``previous`` (URL or None), ``shards_reused`` and ``diff``.
    """
    from vog_ray.driver import score

    if "output" in score_options or score_options.get("overwrite"):
        raise ConfigError("a re-audit writes a new folder under --output-root each time; "
                          "leave out --output and --overwrite")
    options = score_options.get("storage_options") or {}
    name = audit_name(output_root, datetime.datetime.now(datetime.timezone.utc), options)
    config = ScoreConfig(data=data, checkpoints=checkpoints,
                         output=storage.join(output_root, name), **score_options)
    previous = _previous_audit(output_root, options)
    reused = seed_from_previous(config, previous)
    logger.info("re-audit %s: %d shards reused from %s", config.output, len(reused),
                previous[0] if previous else "no previous audit")
    summary = score(config)
    write_latest(output_root, name, read_manifest(config.output, options), options)
    previous_url = previous[0] if previous else None
    summary.update(audit=name, previous=previous_url, shards_reused=len(reused),
                   diff=_diff(previous_url, config.output, options))
    return summary


def register(subparsers) -> None:
    """Add ``reaudit --data ... --checkpoints ... --output-root ROOT`` to the command line."""
    parser = subparsers.add_parser(
        "reaudit", help="audit again under ROOT/<UTC time>, reusing unchanged shards",
        allow_abbrev=False,
        description="Run a new audit in a dated folder under --output-root. Shards unchanged "
                    "since the audit named by ROOT/latest, scored with the same checkpoints and "
                    "options, are copied instead of scored; ROOT/latest then names the new one.",
    )
    add_score_arguments(parser, output=False)
    parser.add_argument("--output-root", required=True,
                        help="folder URL holding the dated audits and the 'latest' pointer")
    parser.set_defaults(func=_run_reaudit)


def _run_reaudit(args: argparse.Namespace) -> int:
    config = config_from_args(argparse.Namespace(**vars(args), output=""))
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name not in ("data", "checkpoints", "output")}
    summary = reaudit(config.data, config.checkpoints, args.output_root, **options)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0
