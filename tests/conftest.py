"""Shared fixtures: a local Ray owned by the test session, and real digits shards + checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch

from vog_ray import demo


def start_local_ray() -> None:
    """(Re)start the session's own Ray on this machine; also used after a multi-node test."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    """A Ray instance of this test session only, on this machine; stopped at the end."""
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """300 real digits in 3 shards of 100, and 5 checkpoints of the demo CNN trained on them."""
    folder = str(tmp_path_factory.mktemp("digits"))
    split = demo.load_split(seed=1, flip_share=0.0)
    chosen = split["train"][:300]
    shards = demo.write_shards(f"{folder}/shards", "part", chosen, split["images"],
                               split["labels"], 100)
    images = demo.preprocess(split["images"][split["train"]])
    labels = torch.from_numpy(split["labels"][split["train"]])
    checkpoints = demo.train(images, labels, f"{folder}/ckpt", epochs=5, seed=1)
    return {
        "folder": folder, "shards": shards, "checkpoints": checkpoints,
        "keys": sorted(demo.key_of(int(i)) for i in chosen),
        "labels": {demo.key_of(int(i)): int(split["labels"][i]) for i in chosen},
        "images": split["images"], "indices": np.asarray(chosen),
    }


def digits_config(digits, output, **overrides):
    """Keyword arguments of a digits audit; tests override what they vary."""
    options = dict(
        data=digits["shards"], checkpoints=digits["checkpoints"], output=str(output),
        model=demo.MODEL, num_classes=10, image_size=demo.IMAGE_SIZE, mean=demo.MEAN,
        std=demo.STD, num_workers=1, threads_per_worker=1, progress=False,
    )
    options.update(overrides)
    return options


S3_BUCKET = "vog-test"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on a free loopback port with one bucket; yields s3fs storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"key": "test-access-key-id", "secret": "test-secret-key-do-not-log",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id=options["key"], aws_secret_access_key=options["secret"],
                 ).create_bucket(Bucket=S3_BUCKET)
    yield {"bucket": S3_BUCKET, "endpoint": endpoint, "storage_options": options}
    server.stop()


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory, ray_local):
    """The digits demo as `make demo` runs it (training plus its four audits), once per session."""
    folder = str(tmp_path_factory.mktemp("demo"))
    result = demo.run_demo(folder, num_workers=1, progress=False)
    return folder, result
