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
from vog_ray.plan import COMMITS, pending, prepare_output, read_commits, run_record
from vog_ray.pool import JobFailed, ShardPool
from vog_ray.reducer import (
    class_stats_table, merged_class_stats, remove_leftovers, write_errors, write_json,
    write_scores, write_table,
)
from vog_ray.worker import ShardResult, ShardScorer

logger = logging.getLogger(__name__)

__all__ = ["JobFailed", "Plan", "make_plan", "reduce_audit", "run_pool", "score"]


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
    if config.report:
        from vog_ray.report import write_report

        summary["files"]["report"] = write_report(config.output,
                                                  storage_options=config.storage_options)
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
        raise ConfigError(
            f"--num-classes is {config.num_classes} but the model gives {num_classes}"
        )
    return num_classes


def _connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``), else start locally."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=True, include_dashboard=False
             if not address else None, configure_logging=False)


def _worker_layout(config: ScoreConfig, num_shards: int) -> tuple[int, dict[str, float], int]:
    """(number of actors, resources per actor, torch threads per actor) on this cluster."""
    return worker_layout(config, num_shards, ray.cluster_resources())


def worker_layout(config: ScoreConfig, num_shards: int, resources: dict[str, float]
                  ) -> tuple[int, dict[str, float], int]:
    """(number of actors, resources per actor, torch threads per actor) for ``resources``.

    One actor per GPU; without GPUs one single-threaded actor per CPU; never more actors than
    shards, and the CPUs of the actors not started go to the others as threads.
    """
    gpus = int(resources.get("GPU", 0))
    if config.device == "cuda" or (config.device == "auto" and gpus > 0):
        count = config.num_workers or max(gpus, 1)
        return min(count, max(num_shards, 1)), {"num_gpus": 1, "num_cpus": 1}, \
            config.threads_per_worker or 1
    # One single-threaded actor per CPU: on small inputs intra-op threads scale poorly, while
    # separate actors overlap one another's decoding with compute (see the README's benchmark).
    cpus = max(int(resources.get("CPU", 1)), 1)
    count = min(config.num_workers or cpus, max(num_shards, 1))
    threads = config.threads_per_worker or max(1, cpus // count)
    return count, {"num_cpus": threads}, threads


def run_pool(config: ScoreConfig, plan: Plan) -> list[ShardResult]:
    """Score the pending shards on a pool of actors; each result is committed as it arrives.

    The actors are stopped however this ends, so that a failed job holds no cluster resources.
    """
    todo = deque(pending(plan.shards, plan.committed))
    if not todo:
        return []
    count, resources, threads = _worker_layout(config, len(todo))
    config_ref = ray.put(_actor_config(config, threads))
    checkpoints_ref = ray.put(plan.checkpoints)
    actor_class = ray.remote(ShardScorer).options(**resources)

    def make():
        return actor_class.remote(config_ref, checkpoints_ref, plan.windows, plan.num_classes,
                                  working_dir=os.getcwd())

    logger.info("scoring %d shards on %d actors (%s)", len(todo), count, resources)
    results: list[ShardResult] = []
    pool = ShardPool(make, count, max_retries=config.max_retries, resources=resources,
                     storage_options=config.storage_options)
    try:
        with tqdm(desc="examples", unit="ex", disable=not config.progress) as bar:
            for result in pool.run(todo):
                commit_shard(config, result)
                results.append(result)
                bar.update(result.read)
    finally:
        pool.shutdown()
    return results


def _actor_config(config: ScoreConfig, threads: int) -> ScoreConfig:
    values = dict(config.__dict__)
    values["threads_per_worker"] = threads
    return ScoreConfig(**values)


def commit_shard(config: ScoreConfig, result: ShardResult) -> None:
    """Make a shard's part visible to readers by writing its commit record."""
    url = storage.join(config.output, COMMITS, f"{result.shard_id}.json")
    write_json(url, result.to_record(), config.storage_options)


def reduce_audit(config: ScoreConfig, plan: Plan, results: list[ShardResult], *,
                 wall_time: float) -> dict[str, Any]:
    """Check the error budget, then write class statistics, scores, errors and the manifest."""
    write_errors(config.output, results, config.storage_options)
    check_error_budget(results, config.max_error_rate,
                       storage.join(config.output, "errors.parquet"))
    stats = merged_class_stats(results, plan.windows)
    write_table(storage.join(config.output, "class_stats.parquet"), class_stats_table(stats),
                config.storage_options)
    write_scores(config.output, results, stats, config.storage_options)
    remove_leftovers(config.output, results, config.storage_options)
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


def check_error_budget(results: list[ShardResult], max_error_rate: float, errors_url: str) -> None:
    """Raise :class:`JobFailed` when too many samples or shards failed; a rate of 1 never fails.

    Both the share of failed samples and the share of shards that could not be read whole
    (missing, empty, cut short) must stay within ``max_error_rate``.
    """
    if max_error_rate >= 1:
        return
    read = sum(r.read for r in results)
    failed = sum(r.failed for r in results)
    broken = sum(1 for r in results if _shard_reasons(r))
    if read == 0:
        raise JobFailed(f"no sample could be read from the {len(results)} shards: "
                        f"{_worst_shards(results)}; check --data")
    if failed / read <= max_error_rate and broken / max(len(results), 1) <= max_error_rate:
        return
    raise JobFailed(
        f"{failed} of {read} samples ({failed / read:.2%}) and {broken} of {len(results)} "
        f"shards ({broken / len(results):.2%}) failed, above --max-error-rate "
        f"{max_error_rate:.2%}; worst shards: {_worst_shards(results)}. Every failure is listed "
        f"in {errors_url}. Fix the data and rerun the same command (shards not read whole are "
        "read again), or pass a higher --max-error-rate"
    )


def _shard_reasons(result: ShardResult) -> list[str]:
    return [e["reason"] for e in result.errors if e.get("key") is None]


def _worst_shards(results: list[ShardResult], limit: int = 5) -> str:
    """Shards not read whole first, then by their share of failed samples."""
    bad = [r for r in results if r.failed or _shard_reasons(r)]
    bad.sort(key=lambda r: (bool(_shard_reasons(r)), r.failed / max(r.read, 1)), reverse=True)
    return ", ".join(_describe(r) for r in bad[:limit]) or "none"


def _describe(result: ShardResult) -> str:
    problems = _shard_reasons(result)
    if result.read:
        problems = [*problems, f"{result.failed}/{result.read} samples failed"]
    return f"{result.url} ({'; '.join(problems)})"
