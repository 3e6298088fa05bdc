"""The fast paths give the scores of the plain one: vmap batching, compile, prefetch depth, batch
size, GPU-style batched JPEG decoding (run here on the CPU), and bf16 within its rank tolerance."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from scipy.stats import spearmanr

from tests.conftest import digits_config
from vog_ray import demo
from vog_ray.checkpoints import build_models, read_checkpoints
from vog_ray.config import ScoreConfig, parse_windows
from vog_ray.device_decode import DeviceJpegReader, decode_batch
from vog_ray.gradients import Checkpoints, GradientOptions, score_batch
from vog_ray.samples import ShardReader, ShardReadState
from vog_ray.worker import ShardScorer

FP32 = GradientOptions(label="true", target="logit", channels="mean", precision="fp32")


@pytest.fixture(scope="module")
def loaded(digits):
    """The digits checkpoints as frozen models, and 128 prepared images with their labels."""
    config = ScoreConfig(**digits_config(digits, "unused"))
    checkpoints = read_checkpoints(digits["checkpoints"])
    reader = ShardReader(config, 10)
    batches = list(reader.batches(digits["shards"][0], ShardReadState(digits["shards"][0])))
    images = torch.cat([b.images for b in batches])[:128]
    labels = torch.cat([b.labels for b in batches])[:128]
    return {"config": config, "checkpoints": checkpoints, "images": images, "labels": labels}


def models_of(loaded):
    models = build_models(loaded["checkpoints"], demo.MODEL, 10)
    for model in models:
        model.requires_grad_(False)
    return models


def scores(models, loaded, options=FP32, windows="early=0:2,late=2:5"):
    spans = parse_windows(windows, len(loaded["checkpoints"]))
    return score_batch(models, loaded["images"], loaded["labels"], spans, options).cpu()


def test_vmap_checkpoint_batching_equals_the_loop(loaded):
    looped = scores(Checkpoints(models_of(loaded), batching="loop"), loaded)
    stacked = scores(Checkpoints(models_of(loaded), batching="vmap"), loaded)
    assert looped.raw.keys() == stacked.raw.keys() == {"all", "early", "late"}
    for name in looped.raw:
        np.testing.assert_allclose(stacked.raw[name].numpy(), looped.raw[name].numpy(),
                                   rtol=1e-4, atol=1e-9)
    assert torch.equal(stacked.preds, looped.preds)
    np.testing.assert_allclose(stacked.loss_last.numpy(), looped.loss_last.numpy(), rtol=1e-5)


def test_compiled_models_give_the_eager_scores(loaded):
    eager = scores(Checkpoints(models_of(loaded)), loaded, windows="")
    compiled = scores(Checkpoints(models_of(loaded), compile=True), loaded, windows="")
    np.testing.assert_allclose(compiled.raw["all"].numpy(), eager.raw["all"].numpy(),
                               rtol=1e-4, atol=1e-9)
    assert torch.equal(compiled.preds, eager.preds)


def test_bf16_ranks_agree_with_fp32(loaded):
    fp32 = scores(models_of(loaded), loaded, windows="")
    bf16 = scores(models_of(loaded), loaded, GradientOptions("true", "logit", "mean", "bf16"),
                  windows="")
    assert bf16.raw["all"].dtype == torch.float64
    rho = spearmanr(fp32.raw["all"].numpy(), bf16.raw["all"].numpy()).statistic
    assert 0.99 <= rho < 1.0, rho
    assert not np.allclose(fp32.raw["all"].numpy(), bf16.raw["all"].numpy(), rtol=1e-6)


def shard_scores(digits, tmp_path, name, **overrides):
    """Raw scores of the first digits shard by key, scored in this process by one ShardScorer."""
    config = ScoreConfig(**digits_config(digits, tmp_path / name, **overrides))
    scorer = ShardScorer(config, read_checkpoints(digits["checkpoints"]),
                         parse_windows("", len(digits["checkpoints"])), 10)
    result = scorer.score_shard(digits["shards"][0], "s0")
    table = pq.read_table(tmp_path / name / result.part)
    assert result.scored == result.read == 100
    return dict(zip(table.column("key").to_pylist(), table.column("vog_raw").to_pylist()))


def test_prefetch_depth_changes_no_score(digits, tmp_path):
    reference = shard_scores(digits, tmp_path, "p0", prefetch=0)
    for depth in (1, 4):
        assert shard_scores(digits, tmp_path, f"p{depth}", prefetch=depth) == reference


def test_batch_sizes_agree_to_float_precision(digits, tmp_path):
    reference = shard_scores(digits, tmp_path, "b64", batch_size=64)
    for size in (7, 100):
        other = shard_scores(digits, tmp_path, f"b{size}", batch_size=size)
        assert other.keys() == reference.keys()
        a = np.array([reference[k] for k in sorted(reference)])
        b = np.array([other[k] for k in sorted(reference)])
        np.testing.assert_allclose(b, a, rtol=1e-4)


def _jpeg(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def jpeg_shard(digits, tmp_path):
    """Digits as RGB JPEG of two sizes, one PNG, one corrupt JPEG and one empty JPEG."""
    url = str(tmp_path / "jpeg.tar")
    rng = np.random.default_rng(0)
    with wds.TarWriter(url) as sink:
        for n, index in enumerate(digits["indices"][:40]):
            gray = (digits["images"][index] * 255 / 16).astype(np.uint8)
            size = 40 if n % 2 else 24
            image = np.asarray(Image.fromarray(gray).resize((size, size)).convert("RGB"))
            image = np.clip(image.astype(int) + rng.integers(0, 30, image.shape), 0, 255)
            data = _jpeg(image.astype(np.uint8))
            sink.write({"__key__": f"s{n:03d}", "jpg": data, "cls": str(n % 10)})
        png = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(png, format="PNG")
        sink.write({"__key__": "png", "png": png.getvalue(), "cls": "1"})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "cls": "2"})
        sink.write({"__key__": "empty", "jpg": b"", "cls": "3"})
    return url


def test_batched_jpeg_decoding_matches_the_cpu_reader(digits, jpeg_shard):
    config = ScoreConfig(**digits_config(digits, "unused", batch_size=16))
    cpu_state, pending_state = ShardReadState(jpeg_shard), ShardReadState(jpeg_shard)
    cpu = list(ShardReader(config, 10).batches(jpeg_shard, cpu_state))
    reader = DeviceJpegReader(config, 10)
    device = [decode_batch(b, reader, torch.device("cpu"), pending_state)
              for b in reader.batches(jpeg_shard, pending_state)]
    keys = [k for b in cpu for k in b.keys]
    assert [k for b in device for k in b.keys] == keys
    assert len(keys) == 41 and "png" in keys
    assert cpu_state.read == pending_state.read == 43
    reasons = sorted((e.key, e.reason) for e in pending_state.errors)
    assert reasons == sorted((e.key, e.reason) for e in cpu_state.errors)
    assert reasons == [("broken", "bad_image"), ("empty", "empty_image")]
    cpu_images, device_images = torch.cat([b.images for b in cpu]), torch.cat(
        [b.images for b in device])
    assert device_images.shape == cpu_images.shape == (41, 3, demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    levels = (device_images - cpu_images).abs().flatten(1).amax(1) * 0.4 * 255
    small = torch.tensor(["png" in k or int(k[1:]) % 2 == 0 for k in keys])
    # At 24 px both decode at full size; PIL decodes the 40 px ones at half size (Image.draft).
    assert levels[small].max() <= 1.01
    assert levels[~small].max() <= 8
    assert torch.equal(torch.cat([b.labels for b in device]), torch.cat([b.labels for b in cpu]))
