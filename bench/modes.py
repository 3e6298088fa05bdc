"""One benchmark mode, run in a process of its own by bench/run.py.

``python bench/modes.py MODE SPEC.json RESULT.json`` runs MODE (limit, baseline or vog_ray) on
the workload described in SPEC.json, writes its timings to RESULT.json and its raw VoG scores,
one per example in example order, to ``scores.npy`` beside it.

- limit: every image preloaded as one normalized tensor, K frozen models, and a loop of forward
  plus backward to the input only; the per-batch variance is the only other work.
- baseline: what users write by hand: per checkpoint a loop over a DataLoader, parameters still
  requiring grad, ``loss.backward()``, every gradient map kept, the variance at the end.
- vog_ray: the engine end to end, from the WebDataset shards through local Ray to Parquet.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vog_ray.checkpoints import build_models, read_checkpoints  # noqa: E402
from vog_ray.config import ScoreConfig  # noqa: E402
from vog_ray.samples import ShardReader, ShardReadState  # noqa: E402
from workload import MEAN, NUM_CLASSES, STD  # noqa: E402


def engine_config(spec: dict, output: str) -> ScoreConfig:
    """The audit configuration of this workload and these options."""
    work = spec["workload"]
    return ScoreConfig(
        data=work["shards"], checkpoints=work["checkpoints"], output=output, model=work["model"],
        num_classes=NUM_CLASSES, image_size=work["image_size"], mean=MEAN, std=STD,
        batch_size=spec["batch_size"], precision=spec["precision"], compile=spec["compile"],
        checkpoint_batching=spec["checkpoint_batching"], device=spec["device"],
        num_workers=spec.get("num_workers"), threads_per_worker=spec.get("threads_per_worker"),
        prefetch=spec["prefetch"], progress=False, overwrite=True,
    )


def device_of(spec: dict) -> torch.device:
    if spec["device"] == "cuda" or (spec["device"] == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def preload(spec: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image, decoded and normalized exactly as the engine does, as one tensor."""
    config = engine_config(spec, output=spec["run_dir"])
    reader = ShardReader(config, NUM_CLASSES)
    use_device_decode = device.type == "cuda" and spec["workload"]["image_format"] == "jpg"
    if use_device_decode:
        from vog_ray.device_decode import DeviceJpegReader, decode_batch

        reader = DeviceJpegReader(config, NUM_CLASSES)
    images, labels = [], []
    for url in spec["workload"]["shards"]:
        state = ShardReadState(url)
        for batch in reader.batches(url, state):
            if use_device_decode:
                batch = decode_batch(batch, reader, device, state)
            images.append(batch.images.to(device))
            labels.append(batch.labels.to(device))
        if state.errors:
            raise RuntimeError(f"the workload shard {url} has unreadable samples: {state.errors}")
    return torch.cat(images), torch.cat(labels)


def frozen_models(spec: dict, device: torch.device, *, trainable: bool = False) -> list:
    work = spec["workload"]
    models = build_models(read_checkpoints(work["checkpoints"]), work["model"], NUM_CLASSES)
    for model in models:
        model.to(device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(trainable)
    return models


def autocast(device: torch.device, precision: str):
    enabled = precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def run_limit(spec: dict) -> tuple[dict, np.ndarray]:
    """Forward and input backward only, on preloaded tensors; one warm-up batch untimed."""
    device = device_of(spec)
    models = frozen_models(spec, device)
    if spec["compile"]:
        models = [torch.compile(model) for model in models]
    images, labels = preload(spec, device)
    size = spec["batch_size"]
    scores = torch.empty(len(labels), dtype=torch.float64, device=device)
    started = time.perf_counter()
    _limit_batch(models, images[:size], labels[:size], spec["precision"], device)
    synchronize(device)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for start in range(0, len(labels), size):
        scores[start:start + size] = _limit_batch(
            models, images[start:start + size], labels[start:start + size], spec["precision"],
            device)
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "warmup_s": warmup, "threads": torch.get_num_threads(),
            **_gpu_memory(device)}, scores.cpu().numpy()


def _limit_batch(models, images, labels, precision, device) -> torch.Tensor:
    maps = []
    for model in models:
        inputs = images.detach().requires_grad_(True)
        with autocast(device, precision):
            logits = model(inputs)
        (grad,) = torch.autograd.grad(logits.float().gather(1, labels[:, None]).sum(), inputs)
        maps.append(grad.float().mean(dim=1))
    stack = torch.stack(maps).double()
    return stack.var(dim=0, correction=0).sqrt().flatten(1).mean(dim=1)


def run_baseline(spec: dict) -> tuple[dict, np.ndarray]:
    """The plain loop a user writes; always fp32 and eager."""
    from torch.utils.data import DataLoader, TensorDataset

    device = device_of(spec)
    models = frozen_models(spec, device, trainable=True)
    images, labels = preload(spec, device)
    loader = DataLoader(TensorDataset(images, labels), batch_size=spec["batch_size"])
    started = time.perf_counter()
    per_checkpoint = []
    for model in models:
        maps = []
        for batch, target in loader:
            batch = batch.clone().requires_grad_(True)
            model.zero_grad()
            model(batch).gather(1, target[:, None]).sum().backward()
            maps.append(batch.grad.mean(dim=1))
        per_checkpoint.append(torch.cat(maps))
    grads = torch.stack(per_checkpoint)
    scores = grads.var(dim=0, unbiased=False).sqrt().flatten(1).mean(dim=1)
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "threads": torch.get_num_threads(),
            **_gpu_memory(device)}, scores.double().cpu().numpy()


def run_vog_ray(spec: dict) -> tuple[dict, np.ndarray]:
    """``vog_ray.score`` from the shards to Parquet; Ray's start is timed on its own."""
    import pyarrow.parquet as pq
    import ray

    import vog_ray
    from vog_ray.driver import _connect_ray

    output = os.path.join(spec["run_dir"], "audit")
    shutil.rmtree(output, ignore_errors=True)
    config = engine_config(spec, output)
    started = time.perf_counter()
    _connect_ray()
    ray_start = time.perf_counter() - started
    summary = vog_ray.score(config)
    elapsed = time.perf_counter() - started
    ray.shutdown()
    table = pq.read_table(os.path.join(output, "scores.parquet"), columns=["key", "vog_raw"])
    order = np.array([int(key[2:]) for key in table.column("key").to_pylist()])
    scores = np.full(spec["workload"]["n"], np.nan)
    scores[order] = table.column("vog_raw").to_numpy()
    return {"seconds": elapsed, "ray_start_s": ray_start, "score_s": elapsed - ray_start,
            "scored": summary["counts"]["scored"]}, scores


def _gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20}


MODES = {"limit": run_limit, "baseline": run_baseline, "vog_ray": run_vog_ray}


def main(argv: list[str]) -> int:
    mode, spec_path, result_path = argv
    with open(spec_path) as handle:
        spec = json.load(handle)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result, scores = MODES[mode](spec)
    np.save(os.path.join(os.path.dirname(result_path), "scores.npy"), scores)
    with open(result_path, "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
