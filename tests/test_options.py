"""Options end to end: unlabeled shards under --label pred, windows, small classes."""

import numpy as np
import pyarrow.parquet as pq
from webdataset import TarWriter

import vog_ray
from tests.conftest import digits_config
from vog_ray import demo


def _write(path, samples):
    with open(path, "wb") as handle, TarWriter(handle) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def test_label_pred_scores_shards_without_any_label(ray_local, digits, tmp_path):
    images = digits["images"]
    samples = [{"__key__": f"u{i:03d}", "png": demo._png(images[i])} for i in range(60)]
    shard = _write(tmp_path / "unlabeled.tar", samples)
    summary = vog_ray.score(**digits_config(digits, tmp_path / "out", data=[shard],
                                            label="pred"))
    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    assert summary["counts"]["scored"] == 60 and summary["counts"]["failed"] == 0
    assert sorted(table["key"]) == [f"u{i:03d}" for i in range(60)]
    assert (table["label"] == table["pred_last"]).all()
    assert table["label_true"].isna().all() and table["correct_last"].isna().all()
    assert (table["label_source"] == "pred").all()
    assert np.isfinite(table["vog_raw"]).all()


def test_windows_and_small_classes_reach_the_files_without_nan(ray_local, digits, tmp_path):
    labels = demo.load_split(seed=1)["labels"]
    images = digits["images"]
    chosen = [i for i in range(len(labels)) if labels[i] in (0, 1)][:40]
    chosen.append(int(np.flatnonzero(labels == 7)[0]))  # a class of one example
    samples = [{"__key__": f"s{i:04d}", "png": demo._png(images[i]), "cls": int(labels[i])}
               for i in chosen]
    shard = _write(tmp_path / "small.tar", samples)
    vog_ray.score(**digits_config(digits, tmp_path / "out", data=[shard],
                                  windows="early=0:2,late=2:5"))
    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    single = table[table["label"] == 7]
    assert len(single) == 1
    for suffix in ("", "_early", "_late"):
        assert single[f"vog{suffix}"].isna().all()
        assert (single[f"vog_flag{suffix}"] == "class_too_small").all()
        rest = table[table["label"] != 7]
        assert rest[f"vog{suffix}"].notna().all() and rest[f"vog_flag{suffix}"].isna().all()
        assert np.isfinite(table[f"vog_raw{suffix}"]).all()
    for column in table.select_dtypes("number").columns:
        assert not np.isinf(table[column].to_numpy(dtype=float, na_value=0.0)).any(), column
    stats = pq.read_table(tmp_path / "out" / "class_stats.parquet").to_pandas()
    assert set(stats["window"]) == {"all", "early", "late"}
    assert stats[(stats.label == 7)]["flag"].tolist() == ["class_too_small"] * 3


def test_by_products_follow_their_definitions(ray_local, digits, tmp_path):
    vog_ray.score(**digits_config(digits, tmp_path))
    table = pq.read_table(tmp_path / "scores.parquet").to_pandas()
    for _, row in table.iterrows():
        correct = list(row["correct"])
        assert correct == [p == row["label_true"] for p in row["preds"]]
        stays = [all(correct[t:]) for t in range(len(correct))]
        expected = stays.index(True) if any(stays) else None
        assert (None if np.isnan(row["learned_at"]) else int(row["learned_at"])) == expected
        flips = sum(a and not b for a, b in zip(correct, correct[1:]))
        assert row["forgetting_events"] == flips
    assert (table["loss_last"] >= 0).all()
    assert ((table["margin_last"] > 0) == table["correct_last"]).all()
