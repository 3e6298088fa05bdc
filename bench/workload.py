"""The benchmark's workload: scikit-learn digits as RGB images, shards and checkpoints.

Every image is a digit upsampled to ``size`` x ``size`` RGB; the dataset is repeated to N
examples, each repeat with its own seeded pixel noise so that no two examples are equal. The K
checkpoints come from a short training run of the chosen torchvision model, one checkpoint
every few optimizer steps, so that they differ the way training checkpoints do. Everything is
cached under the output folder and rebuilt only when missing.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from webdataset import TarWriter

MEAN = (0.3, 0.3, 0.3)
STD = (0.4, 0.4, 0.4)
NUM_CLASSES = 10
STEPS_PER_CHECKPOINT = 3


@dataclass
class Workload:
    """Where the shards and checkpoints of one benchmark configuration are."""

    shards: list[str]
    checkpoints: list[str]
    n: int
    image_size: int
    model: str
    image_format: str

    def to_dict(self) -> dict:
        return asdict(self)


def digits_pixels(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 images and (N,) int64 labels, the digits repeated to N."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images * (255.0 / 16.0)).float()[:, None]
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    base = big[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    index = np.arange(n) % len(base)
    repeat = np.arange(n) // len(base)
    noise = np.random.default_rng(seed).integers(-6, 7, size=(n, size, size), dtype=np.int16)
    noise[repeat == 0] = 0
    pixels = np.clip(base[index].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=3), digits.target[index].astype(np.int64)


def key_of(index: int) -> str:
    return f"ex{index:07d}"


def write_shards(folder: str, pixels: np.ndarray, labels: np.ndarray, *, per_shard: int,
                 image_format: str) -> list[str]:
    """WebDataset shards of ``per_shard`` samples: ``png`` or ``jpg`` image plus ``cls``."""
    os.makedirs(folder, exist_ok=True)
    urls = []
    for number, start in enumerate(range(0, len(labels), per_shard)):
        url = os.path.join(folder, f"part-{number:06d}.tar")
        with open(url, "wb") as handle, TarWriter(handle) as writer:
            for index in range(start, min(start + per_shard, len(labels))):
                writer.write({"__key__": key_of(index),
                              image_format: _encode(pixels[index], image_format),
                              "cls": int(labels[index])})
        urls.append(url)
    return urls


def _encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG")
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def build_model(name: str) -> torch.nn.Module:
    """An untrained torchvision network with 10 classes; nothing is downloaded."""
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)


def train_checkpoints(folder: str, name: str, k: int, pixels: np.ndarray, labels: np.ndarray, *,
                      device: str, seed: int = 0) -> list[str]:
    """Save K state_dicts of one short SGD run, one every few steps."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(name).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    unique = min(len(labels), 1797)
    images = normalize(torch.from_numpy(pixels[:unique])).to(device)
    targets = torch.from_numpy(labels[:unique]).to(device)
    generator = torch.Generator().manual_seed(seed)
    urls = []
    for number in range(k):
        for _ in range(STEPS_PER_CHECKPOINT):
            batch = torch.randint(0, unique, (64,), generator=generator).to(device)
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), targets[batch]).backward()
            optimizer.step()
        url = os.path.join(folder, f"step_{(number + 1) * STEPS_PER_CHECKPOINT:05d}.pt")
        torch.save({key: value.cpu() for key, value in model.state_dict().items()}, url)
        urls.append(url)
    return urls


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, normalized as the audit does."""
    images = pixels.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    return (images - mean) / std


def prepare(out: str, *, n: int, k: int, model: str, image_size: int, image_format: str,
            per_shard: int, device: str) -> Workload:
    """Build (or reuse) the shards and checkpoints of one configuration."""
    data = os.path.join(out, "data", f"{image_format}-{image_size}-n{n}-s{per_shard}")
    weights = os.path.join(out, "checkpoints", f"{model}-{image_size}-k{k}")
    shards = _cached(os.path.join(data, "shards.json"), lambda: write_shards(
        data, *digits_pixels(n, image_size), per_shard=per_shard, image_format=image_format))
    checkpoints = _cached(os.path.join(weights, "checkpoints.json"), lambda: train_checkpoints(
        weights, model, k, *digits_pixels(min(n, 1797), image_size), device=device))
    return Workload(shards, checkpoints, n, image_size, f"torchvision:{model}", image_format)


def _cached(marker: str, build) -> list[str]:
    if os.path.exists(marker):
        with open(marker) as handle:
            return json.load(handle)
    urls = build()
    with open(marker, "w") as handle:
        json.dump(urls, handle)
    return urls
