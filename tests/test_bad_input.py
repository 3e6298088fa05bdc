"""Bad samples and bad shards are recorded, never fatal by themselves; the error budget decides."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

import vog_ray
from tests import nan_model
from tests.conftest import digits_config
from vog_ray import demo
from vog_ray.checkpoints import CheckpointError
from vog_ray.driver import JobFailed

# (key, stage, reason) of every bad sample of the mixed shard, in shard order.
MIXED_ERRORS = [
    ("truncated_jpeg", "decode", "bad_image"),
    ("random_bytes", "decode", "bad_image"),
    ("empty_image", "decode", "empty_image"),
    ("no_label", "label", "missing_label"),
    ("word_label", "label", "bad_label"),
    ("label_ten", "label", "label_out_of_range"),
    ("label_minus_one", "label", "label_out_of_range"),
]


def _encoded(pixels: np.ndarray, mode: str, size=None, image_format="PNG") -> bytes:
    image = Image.fromarray(pixels, mode="L").convert(mode)
    if size is not None:
        image = image.resize(size, Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _write(path, samples) -> str:
    with open(path, "wb") as handle, TarWriter(handle) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _good(digits, index: int) -> dict:
    key = demo.key_of(int(index))
    return {"__key__": key, "png": demo._png(digits["images"][index]),
            "cls": digits["labels"][key]}


def _mixed_samples(digits) -> list[dict]:
    first, pixels = digits["indices"], digits["images"]
    label = digits["labels"][demo.key_of(int(first[0]))]
    jpeg = _encoded(pixels[first[1]], "RGB", (64, 64), "JPEG")
    bad = [
        {"__key__": "truncated_jpeg", "jpg": jpeg[: len(jpeg) * 3 // 5], "cls": 1},
        {"__key__": "random_bytes", "jpg": np.random.default_rng(0).bytes(700), "cls": 1},
        {"__key__": "empty_image", "png": b"", "cls": 1},
        {"__key__": "rgba", "png": _encoded(pixels[first[0]], "RGBA"), "cls": label},
        {"__key__": "large", "jpg": _encoded(pixels[first[2]], "RGB", (3000, 2000), "JPEG"),
         "cls": 2},
        {"__key__": "no_label", "png": demo._png(pixels[first[3]])},
        {"__key__": "word_label", "png": demo._png(pixels[first[3]]), "cls": b"seven"},
        {"__key__": "label_ten", "png": demo._png(pixels[first[3]]), "cls": 10},
        {"__key__": "label_minus_one", "png": demo._png(pixels[first[3]]), "cls": -1},
        {"__key__": "twin", "png": demo._png(pixels[first[4]]), "cls": 3},
        {"__key__": "twin", "png": demo._png(pixels[first[5]]), "cls": 3},
    ]
    return ([_good(digits, i) for i in first[:6]] + bad
            + [_good(digits, i) for i in first[6:12]])


def _cut_shard(path, samples) -> str:
    """A shard whose bytes end inside the image of its last sample."""
    _write(path, samples)
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        last = archive.getmembers()[-1]
    path.write_bytes(data[: last.offset_data + 20])
    return str(path)


@pytest.fixture(scope="module")
def bad_shards(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_shards")
    (folder / "empty.tar").write_bytes(b"")
    with tarfile.open(folder / "no-samples.tar", "w"):
        pass
    cut_samples = [_good(digits, i) for i in digits["indices"][12:18]]
    return {
        "mixed": _write(folder / "mixed.tar", _mixed_samples(digits)),
        "cut": _cut_shard(folder / "cut.tar", cut_samples),
        "cut_keys": [s["__key__"] for s in cut_samples],
        "empty": str(folder / "empty.tar"),
        "no_samples": str(folder / "no-samples.tar"),
        "missing": str(folder / "missing.tar"),
    }


def _all_shards(bad_shards) -> list[str]:
    return [bad_shards[name] for name in ("mixed", "cut", "empty", "no_samples", "missing")]


@pytest.fixture(scope="module")
def bad_audit(ray_local, digits, bad_shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("bad_audit")
    summary = vog_ray.score(**digits_config(digits, output, data=_all_shards(bad_shards),
                                            max_error_rate=1.0, batch_size=8))
    return {
        "summary": summary,
        "scores": pq.read_table(output / "scores.parquet").to_pandas(),
        "errors": pq.read_table(output / "errors.parquet").to_pandas(),
        "manifest": json.loads((output / "manifest.json").read_text()),
    }


def test_every_bad_sample_and_shard_is_recorded_with_its_reason(bad_audit, bad_shards):
    errors = bad_audit["errors"]
    rows = errors[["key", "shard", "stage", "reason"]].fillna("-").itertuples(index=False)
    expected = [(key, bad_shards["mixed"], stage, reason) for key, stage, reason in MIXED_ERRORS]
    expected += [
        (bad_shards["cut_keys"][-1], bad_shards["cut"], "read", "truncated_sample"),
        ("-", bad_shards["cut"], "read", "truncated_shard"),
        ("-", bad_shards["empty"], "read", "empty_shard"),
        ("-", bad_shards["no_samples"], "read", "empty_shard"),
        ("-", bad_shards["missing"], "open", "missing_shard"),
    ]
    assert sorted(tuple(row) for row in rows) == sorted(expected)
    assert errors["key"].isna().sum() == 4
    assert errors["message"].str.len().gt(0).all()
    missing = errors[errors["reason"] == "missing_shard"]["message"].iloc[0]
    assert "FileNotFoundError" in missing and "missing.tar" in missing
    random_bytes = errors[errors["key"] == "random_bytes"]["message"].iloc[0]
    assert random_bytes == "UnidentifiedImageError: cannot identify image file of this sample"


def test_every_good_sample_is_scored_once_and_duplicates_are_kept(bad_audit, digits,
                                                                  bad_shards):
    scores = bad_audit["scores"]
    good = [demo.key_of(int(i)) for i in digits["indices"][:12]]
    expected = sorted(good + ["large", "rgba", "twin", "twin"] + bad_shards["cut_keys"][:-1])
    assert sorted(scores["key"]) == expected
    assert np.isfinite(scores["vog_raw"]).all()
    twins = scores[scores["key"] == "twin"]
    assert twins["duplicate_key"].tolist() == [True, True]
    assert twins["vog_raw"].nunique() == 2
    assert not scores[scores["key"] != "twin"]["duplicate_key"].any()
    by_key = scores.set_index("key", drop=False)
    same_digit = demo.key_of(int(digits["indices"][0]))
    assert by_key.loc["rgba", "vog_raw"] == pytest.approx(by_key.loc[same_digit, "vog_raw"],
                                                          rel=1e-4)
    assert by_key.loc["large", "label"] == 2


def test_manifest_counts_add_up_per_shard(bad_audit, bad_shards):
    manifest = bad_audit["manifest"]
    shards = {entry["url"]: entry for entry in manifest["shards"]}
    for entry in shards.values():
        assert entry["scored"] + entry["failed"] == entry["read"], entry["url"]
    counts = {name: (shards[bad_shards[name]]["read"], shards[bad_shards[name]]["scored"],
                     shards[bad_shards[name]]["failed"], shards[bad_shards[name]]["incomplete"])
              for name in ("mixed", "cut", "empty", "no_samples", "missing")}
    assert counts == {"mixed": (23, 16, 7, False), "cut": (6, 5, 1, True),
                      "empty": (0, 0, 0, False), "no_samples": (0, 0, 0, False),
                      "missing": (0, 0, 0, False)}
    assert manifest["counts"] == {"shards": 5, "shards_incomplete": 1, "shards_unreadable": 1,
                                  "read": 29, "scored": 21, "failed": 8, "duplicate_keys": 2}
    assert bad_audit["summary"]["counts"] == manifest["counts"]


def test_error_budget_fails_naming_the_worst_shards_and_resume_rereads_them(
        ray_local, digits, bad_shards, tmp_path):
    options = digits_config(digits, tmp_path, data=_all_shards(bad_shards), batch_size=8)
    with pytest.raises(JobFailed) as failure:
        vog_ray.score(**options)
    message = str(failure.value)
    assert "8 of 29 samples" in message and "4 of 5 shards" in message
    assert "above --max-error-rate 1.00%" in message
    worst = message.split("worst shards: ")[1]
    assert worst.index("missing.tar (missing_shard") < worst.index("mixed.tar (7/23 samples")
    assert "cut.tar (truncated_shard; 1/6 samples failed)" in worst
    assert (tmp_path / "errors.parquet").exists() and not (tmp_path / "manifest.json").exists()
    assert len(pq.read_table(tmp_path / "errors.parquet")) == 12

    summary = vog_ray.score(**{**options, "max_error_rate": 1.0})
    assert summary["resumed"] and summary["shards_scored_now"] == 4
    assert summary["counts"]["scored"] == 21


def test_strict_fails_on_the_first_bad_sample(ray_local, digits, bad_shards, tmp_path):
    with pytest.raises(JobFailed, match=r"--strict: sample 'truncated_jpeg' of shard .*mixed\.tar"
                       r" failed at decode \(bad_image\)"):
        vog_ray.score(**digits_config(digits, tmp_path, data=[bad_shards["mixed"]],
                                      strict=True, batch_size=8))
    assert not (tmp_path / "manifest.json").exists()
    assert not list((tmp_path / "commits").glob("*.json"))


def test_nonfinite_gradients_are_recorded_and_left_out_of_class_statistics(
        ray_local, digits, tmp_path):
    pixels, indices = digits["images"], digits["indices"][:16]
    samples = []
    for number, index in enumerate(indices):
        image = pixels[index].copy()
        image[0, 0] = 255 if number % 4 == 0 else 0
        key = demo.key_of(int(index))
        samples.append({"__key__": key, "png": demo._png(image), "cls": digits["labels"][key]})
    shard = _write(tmp_path / "corner.tar", samples)
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        checkpoints.append(str(tmp_path / f"linear_{seed}.pt"))
        torch.save(nan_model.factory(10).state_dict(), checkpoints[-1])
    vog_ray.score(**digits_config(digits, tmp_path / "out", data=[shard], checkpoints=checkpoints,
                                  model="tests.nan_model:factory", max_error_rate=1.0))
    bright = sorted(s["__key__"] for n, s in enumerate(samples) if n % 4 == 0)
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pandas()
    assert sorted(errors["key"]) == bright
    assert set(errors["stage"]) == {"gradient"} and set(errors["reason"]) == {"nonfinite_gradient"}
    scores = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    assert len(scores) == 12 and not set(scores["key"]) & set(bright)
    assert np.isfinite(scores["vog_raw"]).all()
    stats = pq.read_table(tmp_path / "out" / "class_stats.parquet").to_pandas()
    for label, group in scores.groupby("label"):
        row = stats[(stats.window == "all") & (stats.label == label)].iloc[0]
        assert row["count"] == len(group)
        assert row["mean"] == pytest.approx(group["vog_raw"].mean(), rel=1e-12)
    assert stats["count"].sum() == 12
    shard_entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"][0]
    assert (shard_entry["read"], shard_entry["scored"], shard_entry["failed"]) == (16, 12, 4)


def _torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _break_checkpoint(problem: str, path, marker) -> None:
    if problem == "missing":
        path.unlink()
    elif problem == "corrupt":
        path.write_bytes(path.read_bytes()[:300])
    elif problem == "other_architecture":
        path.write_bytes(_torch_bytes(demo.digits_cnn(7).state_dict()))
    else:
        path.write_bytes(_torch_bytes({"state_dict": _RunsCode(str(marker))}))


@pytest.mark.parametrize("problem, pattern", [
    ("missing", r"epoch_3\.pt does not exist"),
    ("corrupt", r"epoch_3\.pt is not a readable"),
    ("other_architecture", r"epoch_3\.pt does not fit model .*shape mismatch"),
    ("pickled_code", r"epoch_3\.pt holds objects other than tensors and was refused"),
])
def test_a_bad_checkpoint_stops_the_job_before_scoring(digits, tmp_path, problem, pattern):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoints = []
    for url in digits["checkpoints"]:
        target = folder / url.rsplit("/", 1)[1]
        target.write_bytes(open(url, "rb").read())
        checkpoints.append(str(target))
    marker = tmp_path / "code_was_run"
    _break_checkpoint(problem, folder / "epoch_3.pt", marker)
    with pytest.raises(CheckpointError, match=pattern) as failure:
        vog_ray.score(**digits_config(digits, tmp_path / "out", checkpoints=checkpoints))
    assert str(failure.value).count("epoch_") == 1
    assert not (tmp_path / "out").exists()
    assert not marker.exists()
