"""The whole job through local Ray on real digits shards."""

import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

import vog_ray
from tests.conftest import digits_config


def _scores(output):
    return pq.read_table(f"{output}/scores.parquet").to_pandas().set_index("key").sort_index()


@pytest.fixture(scope="module")
def one_actor(ray_local, digits, tmp_path_factory):
    output = tmp_path_factory.mktemp("one_actor")
    summary = vog_ray.score(**digits_config(digits, output, batch_size=64))
    return summary, _scores(output)


def test_every_key_once_all_finite_and_normalized(one_actor, digits):
    summary, table = one_actor
    assert summary["counts"] == {"shards": 3, "shards_incomplete": 0, "shards_unreadable": 0,
                                 "read": 300, "scored": 300, "failed": 0, "duplicate_keys": 0}
    assert sorted(table.index) == digits["keys"]
    assert table.index.is_unique
    assert np.isfinite(table["vog_raw"]).all() and (table["vog_raw"] > 0).all()
    assert table["vog"].notna().all()
    assert table["label"].to_dict() == digits["labels"]
    for _, group in table.groupby("label"):
        assert group["vog"].mean() == pytest.approx(0.0, abs=1e-9)
        assert group["vog"].std(ddof=0) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(table["vog_abs"], table["vog"].abs())


def test_outputs_and_manifest(one_actor, digits):
    summary, table = one_actor
    manifest = vog_ray.manifest.read_manifest(summary["output"])
    assert [c["url"] for c in manifest["checkpoints"]] == digits["checkpoints"]
    assert all(len(c["sha256"]) == 64 and c["size"] > 0 for c in manifest["checkpoints"])
    assert [s["url"] for s in manifest["shards"]] == sorted(digits["shards"])
    assert all(s["scored"] + s["failed"] == s["read"] == 100 for s in manifest["shards"])
    assert manifest["preprocessing"]["image_size"] == 16
    assert manifest["model"] == "vog_ray.demo_model:digits_cnn"
    assert "storage_options" not in manifest["config"]
    stats = pq.read_table(f"{summary['output']}/class_stats.parquet").to_pandas()
    for label, group in table.groupby("label"):
        row = stats[(stats.window == "all") & (stats.label == label)].iloc[0]
        assert row["count"] == len(group)
        assert row["mean"] == pytest.approx(group["vog_raw"].mean(), rel=1e-12)
        assert row["std"] == pytest.approx(group["vog_raw"].std(ddof=0), rel=1e-9)
    last = table["preds"].map(lambda p: p[-1])
    assert (last == table["pred_last"]).all()
    assert (table["correct_last"] == (table["pred_last"] == table["label_true"])).all()


def test_actor_count_and_shard_order_do_not_change_scores(one_actor, digits, tmp_path):
    _, reference = one_actor
    shuffled = list(digits["shards"])
    random.Random(3).shuffle(shuffled)
    vog_ray.score(**digits_config(digits, tmp_path, data=shuffled, num_workers=2))
    table = _scores(tmp_path)
    for column in ("vog_raw", "vog", "margin_last", "loss_last"):
        assert (table[column].to_numpy() == reference[column].to_numpy()).all(), column


def test_batch_size_one_agrees_within_tolerance(one_actor, digits, tmp_path):
    _, reference = one_actor
    vog_ray.score(**digits_config(digits, tmp_path, batch_size=1))
    table = _scores(tmp_path)
    relative = np.abs(table["vog_raw"] / reference["vog_raw"] - 1)
    assert np.median(relative) < 1e-5
    assert relative.max() < 0.01


def test_rerun_from_the_manifest_alone_gives_the_same_scores(one_actor, tmp_path):
    from vog_ray.cli import main

    summary, reference = one_actor
    assert main(["rerun", summary["output"], "--output", str(tmp_path / "again")]) == 0
    table = _scores(tmp_path / "again")
    assert (table["vog"].to_numpy() == reference["vog"].to_numpy()).all()


def test_rerun_of_an_audit_given_relative_paths_works_from_another_folder(
        ray_local, digits, one_actor, tmp_path, monkeypatch):
    from vog_ray.cli import main

    folder = digits["folder"]
    monkeypatch.chdir(folder)
    relative = digits_config(digits, "audit-rel")
    relative.update(data=[os.path.relpath(s, folder) for s in digits["shards"]],
                    checkpoints=[os.path.relpath(c, folder) for c in digits["checkpoints"]])
    vog_ray.score(**relative)
    monkeypatch.chdir(tmp_path)
    assert main(["rerun", os.path.join(folder, "audit-rel"), "--output", "again"]) == 0
    again = _scores(tmp_path / "again")
    assert (again["vog"].to_numpy() == one_actor[1]["vog"].to_numpy()).all()
