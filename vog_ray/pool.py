"""The pool of scoring actors: every shard comes back exactly once, whatever workers are lost."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterator

import ray

from vog_ray import storage
from vog_ray.plan import shard_id

logger = logging.getLogger(__name__)

LOST_WORKER = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
               ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
               ray.exceptions.OutOfMemoryError)
# How long the pool waits, with no shard in flight, for any actor to start before giving up.
START_TIMEOUT_S = 1800.0
# Shards queued on each started actor, so that it never waits for the driver.
DEPTH = 2


class JobFailed(RuntimeError):
    """The audit stopped: too many failed samples, a sample under --strict, or a lost shard."""


class ShardPool:
    """Keeps each started actor ``DEPTH`` shards deep; replaces lost actors, retries their shards.

    An actor is given shards only once it has started. A replacement that cannot be placed (its
    node is gone and no other node has room) therefore holds no work, and the live actors finish
    the job without it.
    """

    def __init__(self, make: Callable[[], Any], count: int, *, max_retries: int,
                 resources: dict[str, float], storage_options: dict | None = None) -> None:
        self.make = make
        self.max_retries = max_retries
        self.resources = resources
        self.storage_options = storage_options
        self.actors: list[Any] = [None] * count
        self.started = [False] * count
        self.generation = [0] * count
        self.starting: dict[Any, tuple[int, int]] = {}
        self.inflight: dict[Any, tuple[int, int, str]] = {}
        self.attempts: dict[str, int] = {}
        self.start_failures = 0
        for slot in range(count):
            self._start(slot)

    def run(self, todo: deque) -> Iterator[Any]:
        """Score every shard URL in ``todo``; yield each shard's result once, as it arrives."""
        while todo or self.inflight:
            ref = self._next(todo)
            if ref in self.starting:
                self._on_started(ref)
            else:
                result = self._collect(ref, todo)
                if result is not None:
                    yield result
            self._fill(todo)

    def shutdown(self) -> None:
        """Stop every actor of the pool, started or still waiting for room."""
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)

    def _start(self, slot: int) -> None:
        self.actors[slot] = self.make()
        self.started[slot] = False
        ready = self.actors[slot].__ray_ready__.remote()
        self.starting[ready] = (slot, self.generation[slot])

    def _replace(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.generation[slot] += 1
        self._start(slot)

    def _next(self, todo: deque) -> Any:
        timeout = None if self.inflight else START_TIMEOUT_S
        ready, _ = ray.wait([*self.inflight, *self.starting], num_returns=1, timeout=timeout)
        if not ready:
            raise JobFailed(
                f"no scoring actor could start within {START_TIMEOUT_S:.0f} s, so {len(todo)} "
                f"shards wait unscored: the cluster has no room for an actor asking for "
                f"{self.resources}. Add nodes or lower --num-workers / --threads-per-worker, "
                "then rerun the same command to resume"
            )
        return ready[0]

    def _on_started(self, ref: Any) -> None:
        slot, generation = self.starting.pop(ref)
        try:
            ray.get(ref)
        except LOST_WORKER as error:
            self.start_failures += 1
            if self.start_failures > self.max_retries:
                raise JobFailed(self._scrub(
                    f"scoring actors failed to start {self.start_failures} times; last error: "
                    f"{error}"
                )) from error
            logger.warning("a scoring actor failed to start (%s); starting another",
                           type(error).__name__)
            if generation == self.generation[slot]:
                self._replace(slot)
            return
        self.started[slot] = generation == self.generation[slot]

    def _collect(self, ref: Any, todo: deque) -> Any | None:
        slot, generation, url = self.inflight.pop(ref)
        try:
            return ray.get(ref)
        except LOST_WORKER as error:
            self._requeue(url, error, todo)
            if generation == self.generation[slot]:
                self._replace(slot)
        except ray.exceptions.RayTaskError as error:
            raise JobFailed(self._scrub(f"shard {url} failed: {error.cause or error}")) from error
        return None

    def _requeue(self, url: str, error: BaseException, todo: deque) -> None:
        self.attempts[url] = self.attempts.get(url, 0) + 1
        if self.attempts[url] > self.max_retries:
            raise JobFailed(self._scrub(
                f"shard {url} lost its worker {self.attempts[url]} times (--max-retries "
                f"{self.max_retries}); last error: {error}"
            )) from error
        logger.warning("worker lost while scoring %s (%s); scoring it again",
                       url, type(error).__name__)
        todo.appendleft(url)

    def _fill(self, todo: deque) -> None:
        for slot, actor in enumerate(self.actors):
            while todo and self.started[slot] and self._load(slot) < DEPTH:
                url = todo.popleft()
                ref = actor.score_shard.remote(url, shard_id(url))
                self.inflight[ref] = (slot, self.generation[slot], url)

    def _load(self, slot: int) -> int:
        return sum(1 for s, _, _ in self.inflight.values() if s == slot)

    def _scrub(self, text: str) -> str:
        return storage.scrub(text, self.storage_options)
