"""Comparing two audits: matching, percentile ranks, Spearman, top-decile moves, outputs."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from report_fixtures import build_scores, write_audit
from scipy.stats import spearmanr

from vog_ray import storage
from vog_ray.diff import (
    average_ranks,
    diff_audits,
    percentile_ranks,
    register_diff,
    spearman,
)


def _audit(folder, keys, shards, labels, vog_raw) -> str:
    scores = build_scores(list(keys), list(shards), list(labels), np.asarray(vog_raw, float))
    return write_audit(str(folder), scores)


@pytest.fixture
def base():
    """100 examples in 2 classes and 2 shards, with distinct random raw VoG."""
    rng = np.random.default_rng(7)
    keys = [f"k{i:03d}" for i in range(100)]
    shards = [f"s3://old/part-{i // 50}.tar" for i in range(100)]
    labels = [i % 2 for i in range(100)]
    return keys, shards, labels, np.exp(rng.normal(-3, 0.5, 100))


def test_average_and_percentile_ranks_share_ties():
    assert average_ranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    pct = percentile_ranks(np.array([10.0, np.nan, 30.0, 20.0]))
    assert np.isnan(pct[1])
    np.testing.assert_allclose(pct[[0, 3, 2]], [0.5 / 3, 1.5 / 3, 2.5 / 3])


def test_spearman_matches_scipy_and_handles_degenerate_input():
    old = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    new = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 6.0])
    assert spearman(old, new) == pytest.approx(spearmanr(old, new).statistic, abs=1e-12)
    assert spearman(old[:1], new[:1]) is None
    assert spearman(old, np.ones(6)) is None


def test_swap_within_a_class_moves_exactly_two_examples(tmp_path, base):
    keys, shards, labels, raw = base
    old_url = _audit(tmp_path / "old", keys, shards, labels, raw)
    class0 = [i for i in range(100) if labels[i] == 0]
    top = max(class0, key=lambda i: raw[i])
    bottom = min(class0, key=lambda i: raw[i])
    swapped = raw.copy()
    swapped[[top, bottom]] = raw[[bottom, top]]
    new_url = _audit(tmp_path / "new", keys, shards, labels, swapped)

    summary = diff_audits(old_url, new_url, str(tmp_path / "diff"))

    assert summary["match_on"] == "key"
    assert summary["counts"] == {"old": 100, "new": 100, "common": 100, "added": 0,
                                 "removed": 0, "label_changed": 0}
    table = pq.read_table(tmp_path / "old" / "scores.parquet")
    old_vog = table.column("vog").to_numpy()
    new_vog = pq.read_table(tmp_path / "new" / "scores.parquet").column("vog").to_numpy()
    assert summary["spearman"] == pytest.approx(spearmanr(old_vog, new_vog).statistic, abs=1e-12)
    assert summary["spearman_pairs"] == 100
    assert {row["key"] for row in summary["movers"][:2]} == {keys[top], keys[bottom]}
    assert all(row["pct_change"] == 0 for row in summary["movers"][2:])
    pct = percentile_ranks(old_vog)
    mover = {row["key"]: row for row in summary["movers"]}
    assert mover[keys[bottom]]["pct_change"] == pytest.approx(pct[top] - pct[bottom])
    assert [row["key"] for row in summary["entered_top"]] == [keys[bottom]]
    assert [row["key"] for row in summary["left_top"]] == [keys[top]]
    assert summary["top_decile"] == {"entered": 1, "left": 1, "stayed": 9}
    assert summary["outputs"] == {"diff": "diff.parquet", "summary": "diff_summary.json"}
    written = json.loads((tmp_path / "diff" / "diff_summary.json").read_text())
    assert written == summary


def test_added_removed_and_renamed_shards_match_on_unique_keys(tmp_path, base):
    keys, shards, labels, raw = base
    old_url = _audit(tmp_path / "old", keys, shards, labels, raw)
    kept = list(range(5, 100))
    new_keys = [keys[i] for i in kept] + ["n000", "n001", "n002"]
    new_shards = [f"gs://moved/shard-{i % 3}.tar" for i in range(len(new_keys))]
    new_labels = [labels[i] for i in kept] + [0, 1, 1]
    new_raw = np.r_[raw[kept], [0.05, 0.05, 0.06]]
    new_url = _audit(tmp_path / "new", new_keys, new_shards, new_labels, new_raw)

    summary = diff_audits(old_url, new_url, str(tmp_path / "diff"))

    assert summary["match_on"] == "key"
    assert summary["counts"] == {"old": 100, "new": 98, "common": 95, "added": 3, "removed": 5,
                                 "label_changed": 0}
    assert [row["key"] for row in summary["added"]] == ["n000", "n001", "n002"]
    assert [row["key"] for row in summary["removed"]] == keys[:5]
    assert all(row["shard_old"] is None for row in summary["added"])
    diff = pq.read_table(tmp_path / "diff" / "diff.parquet")
    assert diff.num_rows == 103
    rows = {row["key"]: row for row in diff.to_pylist()}
    assert rows["k050"]["shard_old"] == "s3://old/part-1.tar"
    assert rows["k050"]["status"] == "common"
    assert rows["k000"]["status"] == "removed" and rows["k000"]["vog_new"] is None
    assert rows["n000"]["status"] == "added" and rows["n000"]["pct_old"] is None
    pct = [row["pct_new"] for row in rows.values() if row["pct_new"] is not None]
    assert len(pct) == 98 and 0 < min(pct) and max(pct) < 1
    stats = {row["label"]: row for row in summary["class_stats"]}
    assert stats[0]["count_old"] == 50 and stats[1]["count_old"] == 50
    # Kept rows are 5..99: labels 0 and 1 lose 3 and 2 rows; the added ones are 0, 1, 1.
    assert stats[0]["count_new"] == 48 and stats[1]["count_new"] == 50
    assert stats[0]["window"] == "all"


def test_repeated_keys_match_on_shard_and_key_in_order(tmp_path):
    keys = ["a", "b", "a", "b", "b"]
    shards = ["x.tar", "x.tar", "y.tar", "y.tar", "y.tar"]
    labels = [0, 0, 1, 1, 1]
    raw = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    old_url = _audit(tmp_path / "old", keys, shards, labels, raw)
    new_url = _audit(tmp_path / "new", keys, shards, labels, raw[::-1])

    summary = diff_audits(old_url, new_url)

    assert summary["match_on"] == "shard_key"
    assert summary["counts"]["common"] == 5 and summary["outputs"] == {}
    assert not storage.exists(str(tmp_path / "new" / "diff.parquet"))

    renamed = _audit(tmp_path / "renamed", keys, [s.replace(".tar", "-v2.tar") for s in shards],
                     labels, raw)
    moved = diff_audits(old_url, renamed)
    assert moved["counts"]["common"] == 0
    assert (moved["counts"]["added"], moved["counts"]["removed"]) == (5, 5)


def test_label_change_is_counted(tmp_path, base):
    keys, shards, labels, raw = base
    old_url = _audit(tmp_path / "old", keys, shards, labels, raw)
    changed = list(labels)
    changed[0], changed[1] = 1, 0
    new_url = _audit(tmp_path / "new", keys, shards, changed, raw)
    assert diff_audits(old_url, new_url)["counts"]["label_changed"] == 2


def test_missing_audit_names_the_manifest(tmp_path, base):
    keys, shards, labels, raw = base
    old_url = _audit(tmp_path / "old", keys, shards, labels, raw)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        diff_audits(old_url, str(tmp_path / "nothing"))


def test_cli_prints_the_summary_and_writes_files(tmp_path, base, capsys):
    keys, shards, labels, raw = base
    old_url = _audit(tmp_path / "old", keys, shards, labels, raw)
    new_url = _audit(tmp_path / "new", keys, shards, labels, raw * 2)
    parser = argparse.ArgumentParser()
    register_diff(parser.add_subparsers())
    args = parser.parse_args(["diff", old_url, new_url, "--output", str(tmp_path / "out")])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["spearman"] == pytest.approx(1.0)
    assert printed["counts"]["common"] == 100
    table = pq.read_table(io.BytesIO((tmp_path / "out" / "diff.parquet").read_bytes()))
    assert set(table.column("status").to_pylist()) == {"common"}
    assert not any(table.column("entered_top").to_pylist())


def test_the_cli_hook_adds_the_same_command():
    from vog_ray import diff, report

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    diff.register(subparsers)
    report.register(subparsers)
    args = parser.parse_args(["diff", "a", "b"])
    assert (args.old, args.new, args.output) == ("a", "b", None)
    args = parser.parse_args(["report", "out", "--baseline", "old"])
    assert (args.output, args.per_class, args.baseline) == ("out", 8, "old")
