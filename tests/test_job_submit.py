"""``ray job submit`` of jobs/score.py to a real Ray head on loopback, token authentication on.

The head is ``ray start --head --block`` in a session of its own, so that every process it
starts can be found by session id and none outlives the module. Ray replaces 127.0.0.1 with the
machine's address for its own services unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps
this single-node cluster on loopback. The token is made here and handed to the head and to every
client through RAY_AUTH_TOKEN, so ~/.ray/auth_token is neither read nor written.
"""

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RAY = os.path.join(BIN, "ray")
EXCLUDES = json.dumps({"excludes": [".venv", ".git", "demo-output"]})


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def session_pids(session):
    """Process ids whose session id is ``session``, read from /proc."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if name.isdigit() and int(fields[3]) == session:
            found.append(int(name))
    return found


def client_env(token):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0")
    return env


def http_status(url, token=None):
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Head:
    """A ``ray start --head --block`` process and the addresses of its dashboard."""

    def __init__(self, folder):
        assert os.access(RAY, os.X_OK), f"{RAY} is missing: run the tests with the venv's python"
        self.token = secrets.token_hex(32)
        self.env = client_env(self.token)
        gcs, dashboard, client, agent, agent_grpc, metrics, runtime = free_ports(7)
        self.address = f"http://127.0.0.1:{dashboard}"
        self.temp_dir = tempfile.mkdtemp(prefix="vogray-", dir="/tmp")
        self.log_path = os.path.join(folder, "head.log")
        command = [
            RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
            "--include-dashboard=true", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-3000:]

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, f"the Ray head exited:\n{self.log()}"
            try:
                if http_status(f"{self.address}/api/jobs/", self.token)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"the dashboard did not answer in {timeout} s:\n{self.log()}")

    def ray(self, *args, env=None, timeout=300):
        return subprocess.run([RAY, *args], check=False, env=env or self.env, cwd=REPO,
                              text=True, capture_output=True, timeout=timeout)

    def stop(self, timeout=90):
        """SIGTERM the ``ray start`` process; return the processes of its session still alive."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=timeout)
        deadline = time.time() + 30
        while session_pids(self.process.pid) and time.time() < deadline:
            time.sleep(0.5)
        left = session_pids(self.process.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    started = Head(str(tmp_path_factory.mktemp("ray_head")))
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.temp_dir, ignore_errors=True)


def test_submitted_job_writes_the_audit(head, digits, tmp_path):
    output = str(tmp_path / "audit")
    job_id = f"vog-ray-test-{secrets.token_hex(4)}"
    submitted = head.ray(
        "job", "submit", "--address", head.address, "--submission-id", job_id,
        "--working-dir", ".", "--runtime-env-json", EXCLUDES, "--",
        "python", "jobs/score.py", "--data", *digits["shards"],
        "--checkpoints", *digits["checkpoints"], "--model", "vog_ray.demo_model:digits_cnn",
        "--num-classes", "10", "--image-size", "16", "--mean", "0.3,0.3,0.3",
        "--std", "0.4,0.4,0.4", "--output", output, "--no-progress",
        "--num-workers", "1", "--threads-per-worker", "1",
    )
    text = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, text[-4000:]
    assert f"Job '{job_id}' succeeded" in text
    uploaded = glob.glob(f"{head.temp_dir}/session_latest/runtime_resources/working_dir_files/"
                         "_ray_pkg_*/")
    assert len(uploaded) == 1
    assert {"jobs", "vog_ray"} <= set(os.listdir(uploaded[0]))
    assert not {".venv", ".git", "demo-output"} & set(os.listdir(uploaded[0]))
    assert folder_bytes(uploaded[0]) < 5 * 2**20

    keys = pq.read_table(f"{output}/scores.parquet", columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == digits["keys"]
    with open(f"{output}/manifest.json") as handle:
        manifest = json.load(handle)
    assert manifest["counts"]["scored"] == 300
    assert manifest["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))

    code, body = http_status(f"{head.address}/api/jobs/{job_id}", head.token)
    assert (code, json.loads(body)["status"]) == (200, "SUCCEEDED")
    assert json.loads(body)["runtime_env"]["excludes"] == json.loads(EXCLUDES)["excludes"]
    logs = head.ray("job", "logs", "--address", head.address, job_id)
    assert logs.returncode == 0
    assert f"audit written to {output}: 300 scored, 0 failed" in logs.stdout


def test_wrong_or_missing_token_is_refused(head):
    jobs_url = f"{head.address}/api/jobs/"
    assert http_status(jobs_url)[0] == 401
    assert http_status(jobs_url, "0" * 64)[0] == 403
    before = json.loads(http_status(jobs_url, head.token)[1])

    wrong = client_env("0" * 64)
    refused = head.ray("job", "submit", "--address", head.address, "--",
                       "python", "-c", "print('should not run')", env=wrong, timeout=120)
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stdout + refused.stderr
    assert json.loads(http_status(jobs_url, head.token)[1]) == before


def test_head_stops_with_every_process_it_started(head):
    assert session_pids(head.process.pid), "the head's processes should be running"
    left = head.stop()
    assert head.process.returncode is not None
    assert left == []
