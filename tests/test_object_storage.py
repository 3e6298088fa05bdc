"""Shards, checkpoints and outputs on S3 (moto's server on loopback), and no credential leaks."""

import io
import json
import logging
import re

import pyarrow.parquet as pq
import pytest

import vog_ray
from tests.conftest import digits_config
from vog_ray import storage
from vog_ray.diff import diff_audits

ENV_SECRET = "env-secret-0f9e8d7c6b5a"


def _upload(fs, paths: list[str], prefix: str) -> list[str]:
    urls = []
    for path in paths:
        target = f"{prefix}/{path.rsplit('/', 1)[1]}"
        fs.put_file(path, target)
        urls.append(f"s3://{target}")
    return urls


def test_an_audit_on_s3_equals_the_local_one_and_leaks_no_credential(
        ray_local, digits, s3, tmp_path, caplog, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    caplog.set_level(logging.DEBUG, logger="vog_ray")
    options = s3["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    root = f"{s3['bucket']}/audit-test"
    shards = _upload(fs, digits["shards"], f"{root}/shards")
    checkpoints = _upload(fs, digits["checkpoints"], f"{root}/ckpt")
    missing = f"s3://{root}/shards/part-missing.tar"
    output = f"s3://{root}/out"

    vog_ray.score(**digits_config(digits, tmp_path / "local"))
    summary = vog_ray.score(**digits_config(
        digits, output, data=[*shards, missing], checkpoints=[f"s3://{root}/ckpt/epoch_*.pt"],
        storage_options=options, max_error_rate=1.0, report=True,
    ))

    local = pq.read_table(tmp_path / "local" / "scores.parquet")
    remote = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/out/scores.parquet")))
    assert remote.column("shard").to_pylist() == [
        url for url in shards for _ in range(100)
    ]
    assert remote.drop(["shard"]).equals(local.drop(["shard"]))
    manifest = json.loads(fs.cat_file(f"{root}/out/manifest.json"))
    assert [c["url"] for c in manifest["checkpoints"]] == checkpoints
    assert manifest["counts"]["scored"] == 300 and manifest["counts"]["shards_unreadable"] == 1
    assert all("etag" in s["identity"] for s in manifest["shards"] if s["read"])
    errors = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/out/errors.parquet"))).to_pylist()
    assert [(e["shard"], e["stage"], e["reason"]) for e in errors] == [
        (missing, "open", "missing_shard")]
    assert summary["files"]["scores"] == f"{output}/scores.parquet"
    _assert_report_on_s3(fs, f"{root}/out/report", summary)
    compared = diff_audits(str(tmp_path / "local"), output, f"{output}/diff",
                           storage_options=options)
    assert compared["counts"]["common"] == 300 and compared["spearman_pairs"] == 300
    assert compared["spearman"] == pytest.approx(1.0)
    assert fs.exists(f"{root}/out/diff/diff_summary.json")

    secrets = [options["key"], options["secret"], ENV_SECRET]
    for path in fs.find(f"{root}/out"):
        content = fs.cat_file(path)
        assert not [s for s in secrets if s.encode() in content], path
    assert not [s for s in secrets if s in caplog.text]
    assert not [s for s in secrets if s in json.dumps(summary)]


def _assert_report_on_s3(fs, report: str, summary: dict) -> None:
    """index.html and review_queue.csv are in the bucket, and every <img> file the page shows."""
    assert summary["files"]["report"] == f"s3://{report}/index.html"
    assert fs.exists(f"{report}/review_queue.csv")
    html = fs.cat_file(f"{report}/index.html").decode()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert sources, "the report on S3 shows no example image"
    assert all(fs.exists(f"{report}/{source}") for source in sources)


def test_scrub_hides_every_string_of_the_storage_options():
    options = {"key": "AKIA-EXAMPLE", "secret": "s3cr3t/value", "anon": False,
               "client_kwargs": {"endpoint_url": "http://10.0.0.7:9000"}, "token": "ab"}
    text = ("ClientError for http://10.0.0.7:9000/bucket with key AKIA-EXAMPLE "
            "and s3cr3t/value; ab stays")
    assert storage.scrub(text, options) == ("ClientError for ***/bucket with key *** "
                                            "and ***; ab stays")
    assert storage.scrub(text, None) == text


def test_a_remote_write_that_fails_leaves_no_file():
    url = "memory://vog-write-test/scores.parquet"
    with pytest.raises(RuntimeError, match="stop"):
        with storage.open_for_write(url) as handle:
            handle.write(b"half")
            raise RuntimeError("stop")
    assert not storage.exists(url)
    with storage.open_for_write(url) as handle:
        handle.write(b"whole")
    assert storage.read_bytes(url) == b"whole"
    storage.remove(url)
