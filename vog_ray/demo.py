"""The digits demo: real scans to shards, a small CNN trained with checkpoints, a full audit.

A seeded 10% of the training labels are flipped before training, so that the audit can show
what the paper reports: flipped labels gather at high VoG, and test error rises with VoG.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from webdataset import TarWriter

from vog_ray import storage
from vog_ray.demo_model import digits_cnn
from vog_ray.findings import findings

logger = logging.getLogger(__name__)

IMAGE_SIZE = 16
MEAN, STD = (0.3,) * 3, (0.4,) * 3
MODEL = "vog_ray.demo_model:digits_cnn"


def load_split(seed: int, test_share: float = 0.2, flip_share: float = 0.1) -> dict[str, Any]:
    """Digits as uint8 8 x 8 images, split, with a seeded share of training labels flipped."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test, train = order[: int(len(order) * test_share)], order[int(len(order) * test_share):]
    noisy = labels.copy()
    flipped = rng.choice(train, size=int(len(train) * flip_share), replace=False)
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    return {"images": images, "labels": labels, "noisy": noisy, "train": np.sort(train),
            "test": np.sort(test), "flipped": np.sort(flipped)}


def key_of(index: int) -> str:
    return f"digit{index:04d}"


def write_shards(folder: str, name: str, indices, images, labels, per_shard: int) -> list[str]:
    """Write samples as PNG + ``cls`` WebDataset shards with webdataset's own writer."""
    urls = []
    for number, start in enumerate(range(0, len(indices), per_shard)):
        url = storage.join(folder, f"{name}-{number:06d}.tar")
        with storage.open_for_write(url) as handle, TarWriter(handle) as writer:
            for index in indices[start:start + per_shard]:
                writer.write({"__key__": key_of(int(index)), "png": _png(images[index]),
                              "cls": int(labels[index])})
        urls.append(url)
    return urls


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def preprocess(images: np.ndarray) -> torch.Tensor:
    """The same resize and normalization the audit applies to the PNG shards."""
    transform = v2.Compose([
        v2.Resize(IMAGE_SIZE, antialias=True), v2.CenterCrop(IMAGE_SIZE),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD)),
    ])
    tensor = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1)
    return torch.stack([transform(image) for image in tensor])


def train(images: torch.Tensor, labels: torch.Tensor, folder: str, *, epochs: int, seed: int):
    """Train the demo CNN, saving a state_dict checkpoint after every epoch."""
    torch.manual_seed(seed)
    model = digits_cnn(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    urls = []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(labels)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
        url = storage.join(folder, f"epoch_{epoch}.pt")
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        storage.write_bytes(url, buffer.getvalue())
        urls.append(url)
    return urls


def run_demo(output: str = "demo-output", *, epochs: int = 9, seed: int = 0,
             num_workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the data, train, audit the training split and the held-out split, report findings."""
    from vog_ray.driver import score

    started = time.time()
    split = load_split(seed)
    data = storage.join(output, "shards")
    train_urls = write_shards(data, "train", split["train"], split["images"], split["noisy"], 400)
    test_urls = write_shards(data, "test", split["test"], split["images"], split["labels"], 400)
    storage.write_bytes(storage.join(data, "classes.json"), json.dumps(
        [str(d) for d in range(10)]).encode())
    storage.write_bytes(storage.join(output, "flipped.json"), json.dumps(
        [key_of(int(i)) for i in split["flipped"]]).encode())
    images = preprocess(split["images"][split["train"]])
    labels = torch.from_numpy(split["noisy"][split["train"]])
    logger.info("training the demo CNN for %d epochs on %d digits", epochs, len(labels))
    checkpoints = train(images, labels, storage.join(output, "checkpoints"), epochs=epochs,
                        seed=seed)
    common = dict(checkpoints=checkpoints, model=MODEL, num_classes=10, image_size=IMAGE_SIZE,
                  mean=MEAN, std=STD, num_workers=num_workers, progress=progress,
                  overwrite=True)
    audits = {
        "train": score(data=train_urls, output=storage.join(output, "audit-train"),
                       windows="thirds", **common),
        "train_loss": score(data=train_urls, output=storage.join(output, "audit-train-loss"),
                            windows="thirds", target="loss", **common),
        "test_true": score(data=test_urls, output=storage.join(output, "audit-test-true"),
                           **common),
        "test_pred": score(data=test_urls, output=storage.join(output, "audit-test-pred"),
                           label="pred", **common),
    }
    result = findings(output, [key_of(int(i)) for i in split["flipped"]])
    storage.write_bytes(storage.join(output, "findings.json"),
                        json.dumps(result, indent=2).encode())
    return {"output": output, "audits": audits, "findings": result,
            "wall_time_s": round(time.time() - started, 1)}
