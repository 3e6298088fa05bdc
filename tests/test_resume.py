"""Exactly once: a killed job resumes from its commit records; a changed job is refused."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

import vog_ray
from tests.conftest import digits_config, start_local_ray
import vog_ray.pool
from vog_ray import demo
from vog_ray.driver import JobFailed
from vog_ray.plan import ResumeRefused

ROOT = Path(__file__).resolve().parents[1]
SECRET_OPTION = "opt-secret-5e4d3c2b1a"
SECRET_ENV = "env-secret-a1b2c3d4e5"
SHARDS = 12


@pytest.fixture(scope="module")
def small_shards(digits, tmp_path_factory):
    """The 300 digits again, in 12 shards of 25."""
    labels = demo.load_split(seed=1, flip_share=0.0)["labels"]
    folder = str(tmp_path_factory.mktemp("small_shards"))
    return demo.write_shards(folder, "part", digits["indices"], digits["images"], labels, 25)


@pytest.fixture(scope="module")
def reference(ray_local, digits, small_shards, tmp_path_factory):
    """An uninterrupted audit of the small shards, in this process."""
    output = tmp_path_factory.mktemp("reference")
    vog_ray.score(**digits_config(digits, output, data=small_shards, batch_size=5))
    return output


def _command(digits, shards, output) -> list[str]:
    numbers = lambda values: ",".join(str(v) for v in values)  # noqa: E731
    return [
        sys.executable, "-m", "vog_ray.cli", "score", "--data", *shards,
        "--checkpoints", *digits["checkpoints"], "--output", str(output),
        "--model", demo.MODEL, "--num-classes", "10", "--image-size", str(demo.IMAGE_SIZE),
        "--mean", numbers(demo.MEAN), "--std", numbers(demo.STD), "--batch-size", "5",
        "--num-workers", "1", "--threads-per-worker", "1", "--no-progress",
        "--storage-options", json.dumps({"secret": SECRET_OPTION, "token": SECRET_OPTION}),
    ]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_SECRET_ACCESS_KEY=SECRET_ENV, RAY_USAGE_STATS_ENABLED="0")
    return env


def _kill_after_first_commit(process: subprocess.Popen, output: Path) -> list[psutil.Process]:
    """Wait for a commit record, then kill the driver's whole process group.

    Returns the processes the driver had started (its local Ray) that are still alive.
    """
    deadline = time.monotonic() + 240
    while not list((output / "commits").glob("*.json")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no shard was committed within 240 s"
        time.sleep(0.05)
    children = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    _, alive = psutil.wait_procs(children, timeout=20)
    for leftover in alive:
        leftover.kill()
    return alive


def test_a_killed_job_resumes_and_equals_an_uninterrupted_one(
        digits, small_shards, reference, tmp_path):
    output = tmp_path / "out"
    command = _command(digits, small_shards, output)
    first = subprocess.Popen(command, cwd=ROOT, env=_environment(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    left_behind = _kill_after_first_commit(first, output)
    assert left_behind == [], [p.info for p in left_behind]
    committed = len(list((output / "commits").glob("*.json")))
    assert 1 <= committed < SHARDS and not (output / "manifest.json").exists()

    second = subprocess.run(command, cwd=ROOT, env=_environment(), capture_output=True,
                            text=True, timeout=400, start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary["resumed"] and summary["shards_scored_now"] == SHARDS - committed
    assert f"{SHARDS} shards ({committed} already committed)" in second.stderr

    resumed = pq.read_table(output / "scores.parquet")
    assert resumed.num_rows == 300
    assert resumed.equals(pq.read_table(reference / "scores.parquet"))
    records = [json.loads(p.read_text()) for p in (output / "commits").glob("*.json")]
    assert sorted(p.name for p in (output / "parts").iterdir()) == sorted(
        r["part"].rsplit("/", 1)[1] for r in records)
    _assert_no_secret(output, second.stdout + second.stderr)


def _assert_no_secret(output: Path, logs: str) -> None:
    for secret in (SECRET_OPTION, SECRET_ENV):
        assert secret not in logs
        for path in output.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("change", ["option", "checkpoints"])
def test_a_changed_job_is_refused_without_overwrite(digits, small_shards, reference, change):
    changed = {"option": {"target": "prob"},
               "checkpoints": {"checkpoints": digits["checkpoints"][:-1]}}[change]
    options = digits_config(digits, reference, data=small_shards, batch_size=5, **changed)
    before = (reference / "run.json").read_text()
    refusal = "another configuration or checkpoint list.*--overwrite"
    with pytest.raises(ResumeRefused, match=refusal):
        vog_ray.score(**options)
    assert (reference / "run.json").read_text() == before


def test_overwrite_replaces_a_changed_job(ray_local, digits, small_shards, reference, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    summary = vog_ray.score(**digits_config(digits, output, data=small_shards[:1], batch_size=5,
                                            target="prob", overwrite=True))
    assert not summary["resumed"] and summary["shards_scored_now"] == 1
    assert summary["counts"]["scored"] == 25
    run = json.loads((output / "run.json").read_text())
    assert run["config"]["target"] == "prob"
    assert len(list((output / "commits").glob("*.json"))) == 1
    assert len(list((output / "parts").iterdir())) == 1


def _remove_a_node_after_first_commit(cluster: Cluster, nodes: list, output: Path,
                                      done: dict) -> None:
    """Lose a node with a working actor on it as soon as the first shard is committed.

    Both the node's raylet and the actor's process are killed at once, as when a machine goes
    away: a raylet killed alone can leave its worker running long enough to finish its shards.
    """
    deadline = time.monotonic() + 240
    while not list((output / "commits").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    live = _live_actor_pids()
    node = next((n for n in nodes if n.node_id in live), nodes[0])
    done["committed_before"] = len(list((output / "commits").glob("*.json")))
    if node.node_id in live:
        os.kill(live[node.node_id], signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)
    done["removed"] = True


def _live_actor_pids() -> dict[str, int]:
    """Node id -> process id of each live actor."""
    actors = ray._private.state.actors().values()
    return {a["Address"]["NodeID"]: a["Pid"] for a in actors if a["State"] == "ALIVE"}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_lost_node_costs_no_shard(digits, small_shards, reference, tmp_path):
    # caplog captured none of these records once the Cluster was up: the test keeps its own.
    records = _Records()
    logging.getLogger("vog_ray.pool").addHandler(records)
    was_running = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 0},
    })
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        output = tmp_path / "out"
        done: dict = {}
        remover = threading.Thread(target=_remove_a_node_after_first_commit,
                                   args=(cluster, workers, output, done), daemon=True)
        remover.start()
        summary = vog_ray.score(**digits_config(digits, output, data=small_shards, batch_size=5,
                                                num_workers=2, threads_per_worker=1))
        remover.join(timeout=60)
    finally:
        logging.getLogger("vog_ray.pool").removeHandler(records)
        ray.shutdown()
        cluster.shutdown()
        if was_running:
            start_local_ray()
    assert done.get("removed") and done["committed_before"] < SHARDS
    assert any(m.startswith("worker lost while scoring") for m in records.messages)
    assert summary["counts"]["scored"] == 300 and summary["shards_scored_now"] == SHARDS
    table = pq.read_table(output / "scores.parquet")
    assert sorted(table.column("key").to_pylist()) == digits["keys"]
    assert table.equals(pq.read_table(reference / "scores.parquet"))


def test_actors_that_cannot_be_placed_fail_the_job_instead_of_hanging(
        ray_local, digits, small_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(vog_ray.pool, "START_TIMEOUT_S", 3.0)
    with pytest.raises(JobFailed, match=r"no scoring actor could start within 3 s, so 1 shards "
                       r"wait unscored.*'num_gpus': 1"):
        vog_ray.score(**digits_config(digits, tmp_path, data=small_shards[:1], device="cuda"))
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == 2, "the pool left actors holding CPUs"
