"""How many scoring actors start, with what resources: a pure function of the cluster."""

import pytest

from vog_ray.config import ScoreConfig
from vog_ray.driver import worker_layout


def _config(**options):
    return ScoreConfig(data=["d.tar"], checkpoints=["a.pt", "b.pt"], output="out", **options)


@pytest.mark.parametrize("options, shards, resources, expected", [
    ({}, 10, {"CPU": 2}, (2, {"num_cpus": 1}, 1)),
    ({}, 20, {"CPU": 16}, (16, {"num_cpus": 1}, 1)),
    ({}, 1, {"CPU": 2}, (1, {"num_cpus": 2}, 2)),
    ({}, 3, {"CPU": 8}, (3, {"num_cpus": 2}, 2)),
    ({"num_workers": 1}, 10, {"CPU": 2}, (1, {"num_cpus": 2}, 2)),
    ({"num_workers": 2, "threads_per_worker": 3}, 10, {"CPU": 8}, (2, {"num_cpus": 3}, 3)),
    ({}, 10, {"CPU": 32, "GPU": 4}, (4, {"num_gpus": 1, "num_cpus": 1}, 1)),
    ({}, 2, {"CPU": 32, "GPU": 4}, (2, {"num_gpus": 1, "num_cpus": 1}, 1)),
    ({"device": "cpu"}, 10, {"CPU": 4, "GPU": 4}, (4, {"num_cpus": 1}, 1)),
    ({"device": "cuda", "num_workers": 3}, 10, {"CPU": 4}, (3, {"num_gpus": 1, "num_cpus": 1}, 1)),
])
def test_worker_layout(options, shards, resources, expected):
    assert worker_layout(_config(**options), shards, resources) == expected
