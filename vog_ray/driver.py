"""The driver: plan the audit, run the pool of scoring actors, commit shards, reduce."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from tqdm import tqdm

from vog_ray import storage
from vog_ray.checkpoints import Checkpoint, build_models, read_checkpoints, resolve_checkpoint_urls
from vog_ray.config import ConfigError, ScoreConfig, parse_windows
from vog_ray.manifest import build_manifest
from vog_ray.plan import COMMITS, pending, prepare_output, read_commits, run_record, shard_id
from vog_ray.reducer import (
    class_stats_table, merged_class_stats, write_errors, write_json, write_scores, write_table,
)
from vog_ray.worker import ShardResult, ShardScorer

logger = logging.getLogger(__name__)

_LOST_WORKER = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError)


class JobFailed(RuntimeError):
    """The audit stopped: too many failed samples, a sample under --strict, or a lost shard."""


@dataclass
class Plan:
    """What the driver resolved before any scoring: shards, checkpoints, model facts."""

    shards: list[str]
    checkpoints: list[Checkpoint]
    windows: dict[str, tuple[int, int]]
    num_classes: int
    fingerprint: str
    resumed: bool = False
    committed: dict[str, dict[str, Any]] = field(default_factory=dict)


def score(config: ScoreConfig | None = None, **options: Any) -> dict[str, Any]:
    """Run one audit and return its summary (output paths, counts, timings).

    Pass a :class:`ScoreConfig`, or its fields as keyword arguments.
    """
    config = config or ScoreConfig(**options)
    started = time.time()
    plan = make_plan(config)
    _connect_ray()
    new = run_pool(config, plan)
    results = [ShardResult.from_record(r) for r in plan.committed.values()] + new
    summary = reduce_audit(config, plan, results, wall_time=time.time() - started)
    logger.info("audit written to %s: %d scored, %d failed in %.1f s", config.output,
                summary["counts"]["scored"], summary["counts"]["failed"], summary["wall_time_s"])
    return summary


def make_plan(config: ScoreConfig) -> Plan:
    """Resolve shards and checkpoints, check every checkpoint against the model, check output."""
    shards = storage.expand_urls(config.data, config.storage_options)
    checkpoints = read_checkpoints(
        resolve_checkpoint_urls(config.checkpoints, config.storage_options), config.storage_options
    )
    models = build_models(checkpoints, config.model, config.num_classes)
    num_classes = _probe_num_classes(models, config)
    windows = parse_windows(config.windows, len(checkpoints))
    run = run_record(config, checkpoints)
    fingerprint = run["fingerprint"]
    resumed = prepare_output(config.output, run, config.overwrite, config.storage_options)
    committed = read_commits(config.output, shards, config.storage_options) if resumed else {}
    logger.info("%d shards (%d already committed), %d checkpoints, %d classes",
                len(shards), len(committed), len(checkpoints), num_classes)
    return Plan(shards, checkpoints, windows, num_classes, fingerprint, resumed, committed)


def _probe_num_classes(models: list[torch.nn.Module], config: ScoreConfig) -> int:
    """Run each model once on a blank input: checks the image size and counts the outputs."""
    blank = torch.zeros(1, len(config.mean), config.image_size, config.image_size)
    sizes = set()
    with torch.no_grad():
        for model in models:
            try:
                sizes.add(int(model(blank).shape[-1]))
            except RuntimeError as error:
                raise ConfigError(
                    f"the model cannot take a {tuple(blank.shape[1:])} input: {error}; "
                    "check --image-size and --mean/--std (their length is the channel count)"
                ) from error
    if len(sizes) != 1:
        raise ConfigError(f"the checkpoints disagree on the number of classes: {sorted(sizes)}")
    num_classes = sizes.pop()
    if config.num_classes is not None and config.num_classes != num_classes:
        raise ConfigError(f"--num-classes is {config.num_classes} but the model gives {num_classes}")
    return num_classes


def _connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``), else start locally."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=True, include_dashboard=False
             if not address else None, configure_logging=False)


def _worker_layout(config: ScoreConfig, num_shards: int) -> tuple[int, dict[str, float], int]:
    """(number of actors, resources per actor, torch threads per actor)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if config.device == "cuda" or (config.device == "auto" and gpus > 0):
        count = config.num_workers or max(gpus, 1)
        return min(count, max(num_shards, 1)), {"num_gpus": 1, "num_cpus": 1}, \
            config.threads_per_worker or 1
    cpus = max(int(resources.get("CPU", 1)), 1)
    count = config.num_workers or max(1, cpus // 2)
    threads = config.threads_per_worker or max(1, cpus // count)
    return min(count, max(num_shards, 1)), {"num_cpus": threads}, threads


def run_pool(config: ScoreConfig, plan: Plan) -> list[ShardResult]:
    """Score the pending shards on a pool of actors; each result is committed as it arrives."""
    todo = deque(pending(plan.shards, plan.committed))
    if not todo:
        return []
    count, resources, threads = _worker_layout(config, len(todo))
    config_ref = ray.put(_actor_config(config, threads))
    checkpoints_ref = ray.put(plan.checkpoints)
    actor_class = ray.remote(ShardScorer).options(**resources)
    make = lambda: actor_class.remote(config_ref, checkpoints_ref, plan.windows, plan.num_classes)  # noqa: E731
    pool = _Pool(make, count, config.max_retries)
    logger.info("scoring %d shards on %d actors (%s)", len(todo), count, resources)
    results: list[ShardResult] = []
    with tqdm(desc="examples", unit="ex", disable=not config.progress) as bar:
        for result in pool.run(todo):
            commit_shard(config, result)
            results.append(result)
            bar.update(result.read)
    for actor in pool.actors:
        ray.kill(actor)
    return results


def _actor_config(config: ScoreConfig, threads: int) -> ScoreConfig:
    values = dict(config.__dict__)
    values["threads_per_worker"] = threads
    return ScoreConfig(**values)


def commit_shard(config: ScoreConfig, result: ShardResult) -> None:
    """Make a shard's part visible to readers by writing its commit record."""
    url = storage.join(config.output, COMMITS, f"{result.shard_id}.json")
    write_json(url, result.to_record(), config.storage_options)


class _Pool:
    """Keeps every actor two shards deep; replaces lost actors and retries their shards."""

    def __init__(self, make, count: int, max_retries: int) -> None:
        self.make = make
        self.actors = [make() for _ in range(count)]
        self.generation = [0] * count
        self.max_retries = max_retries
        self.attempts: dict[str, int] = {}
        self.inflight: dict[Any, tuple[int, int, str]] = {}

    def run(self, todo: deque):
        for slot in range(len(self.actors)):
            self._fill(slot, todo)
        while self.inflight:
            (ref,), _ = ray.wait(list(self.inflight), num_returns=1)
            slot, generation, url = self.inflight.pop(ref)
            try:
                yield ray.get(ref)
            except _LOST_WORKER as error:
                self._retry(slot, generation, url, todo, error)
            except ray.exceptions.RayTaskError as error:
                raise JobFailed(f"shard {url} failed: {error.cause or error}") from error
            self._fill(slot, todo)

    def _fill(self, slot: int, todo: deque) -> None:
        while todo and sum(1 for s, _, _ in self.inflight.values() if s == slot) < 2:
            url = todo.popleft()
            ref = self.actors[slot].score_shard.remote(url, shard_id(url))
            self.inflight[ref] = (slot, self.generation[slot], url)

    def _retry(self, slot: int, generation: int, url: str, todo: deque, error) -> None:
        self.attempts[url] = self.attempts.get(url, 0) + 1
        if self.attempts[url] > self.max_retries:
            raise JobFailed(
                f"shard {url} lost its worker {self.attempts[url]} times; last error: {error}"
            ) from error
        logger.warning("worker lost while scoring %s (%s); retrying elsewhere",
                       url, type(error).__name__)
        if generation == self.generation[slot]:
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self.make()
            self.generation[slot] += 1
        todo.appendleft(url)


def reduce_audit(config: ScoreConfig, plan: Plan, results: list[ShardResult], *,
                 wall_time: float) -> dict[str, Any]:
    """Check the error budget, then write class statistics, scores, errors and the manifest."""
    read = sum(r.read for r in results)
    failed = sum(r.failed for r in results)
    write_errors(config.output, results, config.storage_options)
    _check_error_budget(config, results, read, failed)
    stats = merged_class_stats(results, plan.windows)
    write_table(storage.join(config.output, "class_stats.parquet"), class_stats_table(stats),
                config.storage_options)
    scored = write_scores(config.output, results, stats, config.storage_options)
    manifest = build_manifest(config, plan, results, wall_time=wall_time)
    write_json(storage.join(config.output, "manifest.json"), manifest, config.storage_options)
    return {
        "output": config.output,
        "files": {name: storage.join(config.output, path)
                  for name, path in manifest["outputs"].items()},
        "counts": manifest["counts"],
        "wall_time_s": manifest["wall_time_s"],
        "resumed": plan.resumed,
        "shards_scored_now": len(results) - len(plan.committed),
    }


def _check_error_budget(config, results, read: int, failed: int) -> None:
    if read == 0:
        shard_errors = [e["message"] for r in results for e in r.errors][:3]
        raise JobFailed(f"no sample could be read from {len(results)} shards: {shard_errors}; "
                        "check --data")
    if failed / read <= config.max_error_rate:
        return
    worst = sorted(results, key=lambda r: r.failed / max(r.read, 1), reverse=True)[:5]
    names = ", ".join(f"{r.url} ({r.failed}/{r.read})" for r in worst if r.failed)
    raise JobFailed(
        f"{failed} of {read} samples failed ({failed / read:.2%}), above --max-error-rate "
        f"{config.max_error_rate:.2%}; worst shards: {names}. See "
        f"{storage.join(config.output, 'errors.parquet')}"
    )
