"""Re-audits on real digits shards: reuse of unchanged shards, and equality with a fresh audit."""

import datetime
import json
import os

import pyarrow.parquet as pq
import pytest

import vog_ray
from tests.conftest import digits_config
from vog_ray import demo, storage
from vog_ray.cli import build_parser
from vog_ray.config import ConfigError
from vog_ray.reaudit import (
    audit_name, current_identities, read_latest, reaudit, reusable_shards, shard_fingerprint,
)


def _options(digits, **overrides):
    """Score options of a digits audit without data, checkpoints and output."""
    options = digits_config(digits, "unused", batch_size=64, **overrides)
    for name in ("data", "checkpoints", "output"):
        options.pop(name)
    return options


def _latest(root):
    return read_latest(root)["audit"]


@pytest.fixture(scope="module")
def runs(ray_local, digits, tmp_path_factory):
    """Three re-audits into one root: 2 shards; a third shard added; a checkpoint added."""
    folder = tmp_path_factory.mktemp("reaudit")
    shards, root = str(folder / "shards"), str(folder / "audits")
    split = demo.load_split(seed=1, flip_share=0.0)
    indices = digits["indices"]

    def write(name, chosen):
        return demo.write_shards(shards, name, chosen, split["images"], split["labels"], 100)

    pattern = f"{shards}/*.tar"
    four = digits["checkpoints"][:4]
    old_shards = write("a", indices[:200])
    first = reaudit([pattern], four, root, **_options(digits))
    latest_first = _latest(root)
    new_shards = write("b", indices[200:])
    second = reaudit([pattern], four, root, **_options(digits))
    latest_second = _latest(root)
    third = reaudit([pattern], digits["checkpoints"], root, **_options(digits))
    return {
        "root": root, "pattern": pattern, "checkpoints": four, "old_shards": old_shards,
        "new_shards": new_shards, "first": first, "second": second, "third": third,
        "latest": [latest_first, latest_second, _latest(root)],
    }


def test_first_run_scores_every_shard(runs):
    first = runs["first"]
    assert (first["shards_scored_now"], first["shards_reused"]) == (2, 0)
    assert first["previous"] is None and first["diff"] is None
    assert first["counts"]["scored"] == 200
    assert runs["latest"][0] == first["audit"]
    assert first["output"] == f"{runs['root']}/{first['audit']}"


def test_second_run_scores_only_the_added_shard(runs):
    first, second = runs["first"], runs["second"]
    assert (second["shards_scored_now"], second["shards_reused"]) == (1, 2)
    assert second["resumed"] is True
    assert second["previous"] == first["output"]
    assert second["counts"]["scored"] == 300 and second["counts"]["shards"] == 3
    assert runs["latest"][1] == second["audit"] != first["audit"]
    old = vog_ray.manifest.read_manifest(first["output"])["shards"]
    new = {s["url"]: s for s in vog_ray.manifest.read_manifest(second["output"])["shards"]}
    assert sorted(new) == sorted(runs["old_shards"] + runs["new_shards"])
    for entry in old:
        assert new[entry["url"]]["part"] == entry["part"]
        for name in (entry["part"], f"commits/{entry['id']}.json"):
            with open(f"{first['output']}/{name}", "rb") as a, \
                    open(f"{second['output']}/{name}", "rb") as b:
                assert a.read() == b.read(), name
    added = new[runs["new_shards"][0]]["part"]
    assert not os.path.exists(f"{first['output']}/{added}")


def test_second_run_equals_an_audit_from_scratch(runs, digits, tmp_path):
    scratch = vog_ray.score(**digits_config(digits, tmp_path, data=[runs["pattern"]],
                                            checkpoints=runs["checkpoints"], batch_size=64))
    assert scratch["shards_scored_now"] == 3
    for name in ("scores.parquet", "class_stats.parquet", "errors.parquet"):
        fresh = pq.read_table(f"{tmp_path}/{name}")
        reused = pq.read_table(f"{runs['second']['output']}/{name}")
        assert reused.num_rows == fresh.num_rows
        assert reused.equals(fresh), name
    assert pq.read_table(f"{tmp_path}/scores.parquet").num_rows == 300


def test_second_run_writes_the_diff_against_the_first(runs):
    diff = runs["second"]["diff"]
    assert diff["output"] == f"{runs['second']['output']}/diff"
    assert diff["counts"]["common"] == 200 and diff["counts"]["added"] == 100
    assert diff["counts"]["removed"] == 0
    summary = json.loads(storage.read_bytes(f"{diff['output']}/diff_summary.json"))
    assert summary["old"] == runs["first"]["output"]
    assert pq.read_table(f"{diff['output']}/diff.parquet").num_rows == 300


def test_added_checkpoint_rescores_every_shard(runs):
    third = runs["third"]
    assert (third["shards_scored_now"], third["shards_reused"]) == (3, 0)
    assert third["resumed"] is False and third["previous"] == runs["second"]["output"]
    assert runs["latest"][2] == third["audit"]
    manifest = vog_ray.manifest.read_manifest(third["output"])
    assert len(manifest["checkpoints"]) == 5


def test_reusable_shards_needs_same_url_and_identity():
    previous = [
        {"url": "s/a.tar", "identity": {"size": 10, "mtime": "1.0"}},
        {"url": "s/b.tar", "identity": {"size": 10, "mtime": "1.0"}},
        {"url": "s/c.tar", "identity": {}},
        {"url": "s/gone.tar", "identity": {"size": 1, "etag": "x"}},
    ]
    now = {"s/a.tar": {"size": 10, "mtime": "1.0"}, "s/b.tar": {"size": 10, "mtime": "2.0"},
           "s/c.tar": {}}
    chosen = reusable_shards(["s/new.tar", "s/c.tar", "s/b.tar", "s/a.tar"], previous, now)
    assert [entry["url"] for entry in chosen] == ["s/a.tar"]


def test_rewritten_shard_gets_a_new_identity(tmp_path):
    shard = tmp_path / "x.tar"
    shard.write_bytes(b"0" * 512)
    os.utime(shard, (1_000_000, 1_000_000))
    before = current_identities([str(shard), str(tmp_path / "missing.tar")])
    shard.write_bytes(b"1" * 512)
    os.utime(shard, (2_000_000, 2_000_000))
    after = current_identities([str(shard)])
    assert list(before) == [str(shard)]
    assert before[str(shard)]["size"] == after[str(shard)]["size"] == 512
    assert before[str(shard)] != after[str(shard)]


def test_shard_fingerprint_ignores_folders_and_patterns_only():
    base = vog_ray.ScoreConfig(data=["a/*.tar"], checkpoints=["c/*.pt"], output="root/1")
    moved = vog_ray.ScoreConfig(data=["a/x.tar", "a/y.tar"], checkpoints=["c/1.pt", "c/2.pt"],
                                output="root/2", num_workers=7)
    other = vog_ray.ScoreConfig(data=["a/*.tar"], checkpoints=["c/*.pt"], output="root/1",
                                batch_size=32)
    hashes = ["1" * 64, "2" * 64]
    reference = shard_fingerprint(base.to_dict(), hashes)
    assert shard_fingerprint(moved.to_dict(), hashes) == reference
    assert shard_fingerprint(json.loads(json.dumps(base.to_dict())), hashes) == reference
    assert shard_fingerprint(other.to_dict(), hashes) != reference
    assert shard_fingerprint(base.to_dict(), hashes[::-1]) != reference
    assert shard_fingerprint(base.to_dict(), hashes + ["3" * 64]) != reference


def test_audit_name_is_utc_and_unique(tmp_path):
    now = datetime.datetime(2026, 12, 3, 22, 5, 9, tzinfo=datetime.timezone(
        datetime.timedelta(hours=2)))
    assert audit_name(str(tmp_path), now) == "20261203T200509Z"
    (tmp_path / "20261203T200509Z").mkdir()
    (tmp_path / "20261203T200509Z-2").mkdir()
    assert audit_name(str(tmp_path), now) == "20261203T200509Z-3"


def test_broken_latest_pointer_names_the_file(tmp_path):
    assert read_latest(str(tmp_path)) is None
    (tmp_path / "latest").write_text("not json")
    with pytest.raises(ValueError, match=f"{tmp_path}/latest should be JSON"):
        read_latest(str(tmp_path))
    (tmp_path / "latest").write_text(json.dumps({"audit": "../elsewhere"}))
    with pytest.raises(ValueError, match="not a folder directly under"):
        read_latest(str(tmp_path))


def test_command_line_takes_output_root_not_output(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["reaudit", "--data", "s/*.tar", "--checkpoints", "c/*.pt",
                              "--output-root", str(tmp_path), "--batch-size", "8"])
    assert (args.output_root, args.batch_size, args.data) == (str(tmp_path), 8, ["s/*.tar"])
    with pytest.raises(SystemExit):
        parser.parse_args(["reaudit", "--data", "s", "--checkpoints", "c", "--output", "o"])
    with pytest.raises(ConfigError, match="leave out --output and --overwrite"):
        reaudit(["s/*.tar"], ["c/*.pt"], str(tmp_path), overwrite=True)
