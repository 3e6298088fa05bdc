"""The deployment files: cluster.yaml against Ray's own schema, the KubeRay RayJob, the CronJob."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "rayjob.yaml"
CRONJOB_YAML = ROOT / "deploy" / "cronjob.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
DASHBOARD_PORT = 8265
ENTRY_FLAGS = ("--data", "--checkpoints", "--model", "--output")
CREDENTIAL_PATTERNS = (
    r"aws_secret_access_key", r"aws_access_key_id", r"aws_session_token", r"SecretAccessKey",
    r"\bAKIA[0-9A-Z]{16}\b", r"\bASIA[0-9A-Z]{16}\b", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"password\s*:", r"RAY_AUTH_TOKEN\s*=\s*\S",
)


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return _load(CLUSTER_YAML)


def _worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: node for name, node in cluster["available_node_types"].items()
            if name != cluster["head_node_type"]}


def _gpu_worker(cluster: dict[str, Any]) -> dict[str, Any]:
    gpu_types = [node for node in _worker_types(cluster).values()
                 if node["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) == 1, "expected exactly one GPU worker node type"
    return gpu_types[0]


# ---------------------------------------------------------------------------------------------
# cluster.yaml


def test_cluster_yaml_validates_against_rays_schema(cluster: dict[str, Any]) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(cluster, schema)
    # What `ray up` does before it talks to AWS: fill in defaults, then validate again.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_gpu_workers_autoscale_from_zero_with_one_actor_per_gpu(cluster: dict[str, Any]) -> None:
    worker = _gpu_worker(cluster)
    resources = worker["resources"]
    assert worker["min_workers"] == 0
    assert worker["max_workers"] == 8
    assert cluster["max_workers"] >= worker["max_workers"]
    assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))
    # The scoring actor asks for one GPU and one CPU.
    assert resources["GPU"] == 1 and resources["CPU"] >= 1


def test_head_is_a_cpu_node(cluster: dict[str, Any]) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_storage_access_comes_from_instance_profiles(cluster: dict[str, Any]) -> None:
    for name, node in cluster["available_node_types"].items():
        profile = node["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), name


@pytest.mark.parametrize("path", [CLUSTER_YAML, RAYJOB_YAML, CRONJOB_YAML],
                         ids=lambda path: path.name)
def test_no_credentials_in_deployment_files(path: Path) -> None:
    text = path.read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not re.search(pattern, text, re.IGNORECASE), f"{path.name} matches {pattern}"


def _opens_dashboard(permission: dict[str, Any]) -> bool:
    if str(permission.get("IpProtocol")) == "-1":
        return any(r.get("CidrIp") or r.get("CidrIpv6")
                   for r in permission.get("IpRanges", []) + permission.get("Ipv6Ranges", []))
    low, high = permission.get("FromPort", -1), permission.get("ToPort", -1)
    return low <= DASHBOARD_PORT <= high


def test_dashboard_is_not_exposed(cluster: dict[str, Any]) -> None:
    permissions = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(_opens_dashboard(permission) for permission in permissions)
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "--dashboard-port" not in head_start


def test_token_authentication_is_on(cluster: dict[str, Any]) -> None:
    starts = [command for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for command in cluster[key] if "ray start" in command]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token" in command for command in starts)
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def _pins(text: str, package: str) -> set[str]:
    return set(re.findall(rf"\b{package}==([0-9][0-9.]*)", text))


def test_setup_installs_this_package_after_torch(cluster: dict[str, Any]) -> None:
    assert cluster["file_mounts"]["~/vog_ray"] == "."
    commands = cluster["setup_commands"]
    package = [i for i, command in enumerate(commands)
               if "pip install" in command and "-e" in command.split() and "vog_ray" in command]
    torch = [i for i, command in enumerate(commands) if re.search(r"\btorch==", command)]
    assert package and torch and torch[0] < package[0]
    makefile = (ROOT / "Makefile").read_text()
    setup = "\n".join(commands)
    for name in ("torch", "torchvision"):
        assert _pins(setup, name) == _pins(makefile, name) != set(), name


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(RAYJOB_YAML)


def _check_entrypoint(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "jobs/score.py"]
    for flag in ENTRY_FLAGS:
        assert flag in words, flag
        value = words[words.index(flag) + 1]
        assert value and not value.startswith("--"), flag
    return words[2:]


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", [])}


def test_rayjob_runs_the_scoring_entry_point(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    _check_entrypoint(rayjob["spec"]["entrypoint"])
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["working_dir"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_arguments_are_accepted_by_the_score_parser(rayjob: dict[str, Any]) -> None:
    commands = pytest.importorskip("vog_ray.commands")
    parser = argparse.ArgumentParser()
    commands.add_score_arguments(parser)
    arguments = _check_entrypoint(rayjob["spec"]["entrypoint"])
    parsed = parser.parse_args(arguments)
    assert parsed.data and parsed.checkpoints and parsed.model and parsed.output


def test_rayjob_gpu_workers_autoscale_from_zero(rayjob: dict[str, Any]) -> None:
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    assert cluster_spec["enableInTreeAutoscaling"] is True
    (group,) = [group for group in cluster_spec["workerGroupSpecs"]
                if "nvidia.com/gpu" in _containers(group["template"])[0]["resources"]["limits"]]
    assert group["minReplicas"] == 0 and group["maxReplicas"] == 8
    limits = _containers(group["template"])[0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1"


def test_rayjob_turns_token_authentication_on_everywhere(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    cluster_spec = spec["rayClusterSpec"]
    templates = [spec["submitterPodTemplate"], cluster_spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster_spec["workerGroupSpecs"]]
    environments = [_env(container) for template in templates
                    for container in _containers(template)]
    environments.append(_env(cluster_spec["autoscalerOptions"]))
    for env in environments:
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"]
    for template in templates:
        assert template["spec"]["serviceAccountName"], "storage access comes from the account"


_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_ITEM = re.compile(r"^(\*|\d+(?:-\d+)?)(?:/(\d+))?$")


def _cron_field_ok(field: str, low: int, high: int) -> bool:
    for item in field.split(","):
        match = _CRON_ITEM.match(item)
        if not match:
            return False
        span, step = match.groups()
        if step is not None and int(step) == 0:
            return False
        if span != "*":
            bounds = [int(number) for number in span.split("-")]
            if not all(low <= number <= high for number in bounds) or bounds != sorted(bounds):
                return False
    return True


def test_cron_field_check_rejects_bad_fields() -> None:
    assert _cron_field_ok("*/15", 0, 59) and _cron_field_ok("1-5,0", 0, 7)
    assert not _cron_field_ok("60", 0, 59)
    assert not _cron_field_ok("5-1", 0, 7)
    assert not _cron_field_ok("*/0", 0, 59)
    assert not _cron_field_ok("mon", 0, 7)


@pytest.fixture(scope="module")
def cron_documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in _load_all(CRONJOB_YAML)}


def test_cronjob_schedule_parses(cron_documents: dict[str, dict[str, Any]]) -> None:
    cronjob = cron_documents["CronJob"]
    assert cronjob["apiVersion"] == "batch/v1"
    fields = cronjob["spec"]["schedule"].split()
    assert len(fields) == 5
    for field, (low, high) in zip(fields, _CRON_RANGES):
        assert _cron_field_ok(field, low, high), field


def test_cronjob_creates_the_rayjob(cron_documents: dict[str, dict[str, Any]]) -> None:
    pod = cron_documents["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["kubectl", "create", "-f"]
    (mount,) = container["volumeMounts"]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    (item,) = volume["configMap"]["items"]
    assert command[3] == f"{mount['mountPath']}/{item['path']}"
    # The ConfigMap is made from deploy/rayjob.yaml by the command the deployment guide gives.
    config_map = volume["configMap"]["name"]
    made_by = f"kubectl create configmap {config_map} --from-file={item['key']}=deploy/rayjob.yaml"
    assert made_by in CRONJOB_YAML.read_text()
    assert made_by in DEPLOY_DOC.read_text()
    created = _load(RAYJOB_YAML)
    assert created["kind"] == "RayJob"
    _check_entrypoint(created["spec"]["entrypoint"])


def test_cronjob_may_only_create_rayjobs(cron_documents: dict[str, dict[str, Any]]) -> None:
    pod = cron_documents["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    binding = cron_documents["RoleBinding"]
    assert binding["roleRef"]["name"] == cron_documents["Role"]["metadata"]["name"]
    assert [subject["name"] for subject in binding["subjects"]] == [pod["serviceAccountName"]]
    assert cron_documents["Role"]["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
