"""Shared fixtures: a local Ray owned by the test session, and real digits shards + checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch

from vog_ray import demo


@pytest.fixture(scope="session")
def ray_local():
    """A Ray instance of this test session only, on this machine; stopped at the end."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
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
