"""The HTML report: exact contents on a synthetic audit, then a real demo audit in Chromium."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from report_fixtures import digit_pixels, make_digits_audit

from vog_ray import storage
from vog_ray.report import REVIEW_QUEUE_COLUMNS, register_report, write_report
from vog_ray.report_figures import error_by_decile, mean_vog_by, thumbnail
from vog_ray.report_images import array_image, decode_image

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
)


class _Links(HTMLParser):
    """Every src and href of a page, and the alt text of its images in order."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.alts: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        self.links += [values[name] for name in ("src", "href") if values.get(name)]
        if tag == "img" and "alt" in values:
            self.alts.append(values["alt"])


def _parse(html: str) -> _Links:
    parser = _Links()
    parser.feed(html)
    return parser


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic digits audit (3 PNG shards of 40) and its report with 3 examples per side."""
    audit = make_digits_audit(str(tmp_path_factory.mktemp("synthetic")))
    index = write_report(audit, per_class=3)
    return {"audit": audit, "index": index, "html": Path(index).read_text(),
            "scores": pq.read_table(f"{audit}/scores.parquet")}


def test_links_are_relative_and_every_file_exists(synthetic):
    links = _parse(synthetic["html"]).links
    files = [link for link in links if not link.startswith("#")]
    assert len(files) > 60
    for link in files:
        assert "://" not in link and not link.startswith("/"), link
        assert (Path(synthetic["index"]).parent / link).is_file(), link


def test_each_class_shows_its_lowest_then_highest_vog(synthetic):
    scores = synthetic["scores"].to_pylist()
    expected = []
    for label in range(10):
        ranked = sorted((r for r in scores if r["label"] == label), key=lambda r: r["vog"])
        expected += [r["key"] for r in ranked[:3]] + [r["key"] for r in ranked[::-1][:3]]
    chart_alts = 3
    assert _parse(synthetic["html"]).alts[:-chart_alts] == expected
    assert "Class 3 (three)" in synthetic["html"]


def test_thumbnails_are_the_shard_images_upscaled_by_nearest_neighbour(synthetic):
    scores = synthetic["scores"].to_pylist()
    lowest = min((r for r in scores if r["label"] == 0), key=lambda r: r["vog"])
    thumb = np.asarray(Image.open(Path(synthetic["index"]).parent / "img/c0-low-0.png"))
    assert thumb.shape == (96, 96)
    expected = np.kron(digit_pixels(int(lowest["key"][1:])), np.ones((12, 12), np.uint8))
    np.testing.assert_array_equal(thumb, expected)
    grid = Image.open(Path(synthetic["index"]).parent / "img/c0-grid.png")
    assert grid.size == (8 * 96 + 48, 96)


def test_review_queue_lists_the_highest_vog_first(synthetic):
    path = Path(synthetic["index"]).parent / "review_queue.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert tuple(rows[0]) == REVIEW_QUEUE_COLUMNS
    assert len(rows) == synthetic["scores"].num_rows == 120
    vog = [float(row["vog"]) for row in rows]
    assert vog == sorted(vog, reverse=True)
    scores = synthetic["scores"].to_pylist()
    top = max(scores, key=lambda r: r["vog"])
    assert (rows[0]["key"], rows[0]["shard"], int(rows[0]["label"])) == (
        top["key"], top["shard"], top["label"])
    assert 'href="review_queue.csv"' in synthetic["html"]


def test_summary_comes_from_the_manifest_and_errors(synthetic):
    html = synthetic["html"]
    for text in ("<b>122</b>samples read", "<b>120</b>scored", "<b class=\"bad\">2</b>failed",
                 "<b>5</b>checkpoints", "<b>3</b>shards", "12.3 s", "synthetic:digits-mlp",
                 "<td>decode</td><td>bad_image</td>", "<td>read</td><td>truncated_shard</td>",
                 "digits-0002.tar", "fp32"):
        assert text in html, text
    for chart in ("error_by_decile.png", "vog_raw_by_class.png", "vog_by_dynamics.png"):
        assert (Path(synthetic["index"]).parent / chart).stat().st_size > 5000


def test_error_rate_per_decile_has_known_values():
    vog = np.arange(100, dtype=float)[::-1]
    rows = error_by_decile(pa.table({"vog": vog, "correct_last": pa.array(vog < 90)}))
    assert [r["count"] for r in rows] == [10] * 10
    assert [r["error_rate"] for r in rows] == [0.0] * 9 + [1.0]
    assert (rows[0]["vog_min"], rows[0]["vog_max"], rows[-1]["vog_min"]) == (0, 9, 90)
    correct = (np.arange(20) % 4 == 0).tolist()
    correct[0] = None
    rows = error_by_decile(pa.table({"vog": np.arange(20.0), "correct_last": correct}))
    assert sum(r["count"] for r in rows) == 19
    assert rows[0] == {"decile": 1, "count": 2, "vog_min": 1.0, "vog_max": 2.0, "error_rate": 1.0}
    assert (rows[1]["count"], rows[1]["vog_min"], rows[1]["error_rate"]) == (2, 3.0, 0.5)
    assert error_by_decile(pa.table({"vog": vog})) == []


def test_mean_vog_per_learned_at_and_forgetting_count():
    table = pa.table({"vog": [1.0, 3.0, 5.0, 7.0, None],
                      "learned_at": pa.array([0, 0, 1, None, 1], pa.int32()),
                      "forgetting_events": pa.array([None] * 5, pa.int32())})
    assert mean_vog_by(table, "learned_at") == [
        {"value": "0", "count": 2, "mean_vog": 2.0}, {"value": "1", "count": 1, "mean_vog": 5.0},
        {"value": "never", "count": 1, "mean_vog": 7.0}]
    assert mean_vog_by(table, "forgetting_events") == []


def test_arrays_and_odd_modes_become_displayable_images():
    chw = np.zeros((3, 4, 6), np.float32)
    chw[0] = 1.0
    image = array_image(chw)
    assert (image.mode, image.size) == ("RGB", (6, 4))
    assert image.getpixel((0, 0)) == (255, 0, 0)
    stretched = np.asarray(array_image(np.array([[0.0, 8.0], [16.0, 4.0]])))
    assert stretched.tolist() == [[0, 128], [255, 64]]
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(buffer, format="PNG")
    assert np.asarray(decode_image(buffer.getvalue(), "png")).tolist() == [[0, 255]]
    assert thumbnail(Image.new("L", (8, 8))).size == (96, 96)
    assert thumbnail(Image.new("RGB", (300, 200))).size == (96, 64)
    with pytest.raises(ValueError, match="HxW"):
        array_image(np.zeros((2, 3, 4, 5)))


def test_npy_shards_without_labels_and_a_lost_shard(tmp_path, caplog):
    audit = make_digits_audit(str(tmp_path), shards=2, per_shard=30, extension="npy",
                              with_labels=False)
    lost = tmp_path / "shards" / "digits-0001.tar"
    lost.unlink()
    with caplog.at_level(logging.WARNING, logger="vog_ray.report"):
        index = write_report(audit, per_class=2)
    html = Path(index).read_text()
    assert str(lost) in caplog.text
    shown = list((Path(index).parent / "img").glob("c*-l*.png")) + list(
        (Path(index).parent / "img").glob("c*-h*.png"))
    missing = html.count("image not found")
    assert missing > 0 and len(shown) > 0 and missing + len(shown) == 40
    assert "carry no true labels" in html
    assert not (Path(index).parent / "error_by_decile.png").exists()
    thumb = Image.open(shown[0])
    assert thumb.size == (96, 96)


def test_memory_filesystem_with_a_baseline_and_escaping():
    fs = fsspec.filesystem("memory")
    try:
        old = make_digits_audit("memory://vog-report/old", shards=2, per_shard=20)
        new = make_digits_audit("memory://vog-report/new", shards=2, per_shard=20, seed=3)
        manifest = json.loads(storage.read_bytes(f"{new}/manifest.json"))
        manifest["options"]["note"] = "<script>alert(1)</script>"
        storage.write_bytes(f"{new}/manifest.json", json.dumps(manifest).encode())
        index = write_report(new, per_class=2, baseline=old)
        assert index == "memory://vog-report/new/audit/report/index.html"
        html = storage.read_bytes(index).decode()
        for name in ("review_queue.csv", "img/c0-low-0.png", "diff/diff.parquet",
                     "diff/diff_summary.json", "vog_raw_by_class.png"):
            assert fs.exists(f"/vog-report/new/audit/report/{name}"), name
        assert "Compared to the baseline audit" in html and "<b>40</b>in both" in html
        assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    finally:
        fs.rm("/vog-report", recursive=True)


def test_command_line_and_argument_checks(tmp_path, synthetic, capsys):
    audit = shutil.copytree(synthetic["audit"], tmp_path / "audit", ignore=lambda *_: ["report"])
    parser = argparse.ArgumentParser()
    register_report(parser.add_subparsers())
    args = parser.parse_args(["report", str(audit), "--per-class", "1", "--review-size", "5"])
    assert args.func(args) == 0
    index = capsys.readouterr().out.strip()
    assert index == f"{audit}/report/index.html"
    assert len(_parse(Path(index).read_text()).alts) == 10 * 2 + 3
    assert len(Path(audit, "report", "review_queue.csv").read_text().splitlines()) == 1 + 5
    with pytest.raises(ValueError, match="per_class"):
        write_report(str(audit), per_class=0)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        write_report(str(tmp_path))


# A real audit from the digits demo, rendered by a headless browser.


@pytest.fixture(scope="module")
def demo_audits(demo_output):
    """The output folder of the session's digits demo (see conftest)."""
    return demo_output[0]


def _chromium(url: str, profile: Path, *options: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Chromium is not installed; `make browser` installs it")
    command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *options, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_demo_report_renders_in_chromium(demo_audits, tmp_path):
    index = write_report(f"{demo_audits}/audit-train", per_class=8)
    html = Path(index).read_text()
    images = html.count("<img ")
    assert images == 10 * 16 + 3

    dom = _chromium(Path(index).as_uri(), tmp_path / "profile-dom", "--dump-dom")
    assert f'data-images-ok="{images}/{images}"' in dom.stdout
    assert _console_lines(dom.stderr) == []

    screenshot = tmp_path / "report.png"
    shot = _chromium(Path(index).as_uri(), tmp_path / "profile-shot",
                     f"--screenshot={screenshot}", "--window-size=1400,3000")
    assert _console_lines(shot.stderr) == []
    picture = Image.open(screenshot)
    assert picture.format == "PNG" and picture.size == (1400, 3000)
    assert screenshot.stat().st_size > 100_000
    assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20)) > 100
    if os.environ.get("VOG_RAY_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["VOG_RAY_SCREENSHOT"])


def test_demo_report_against_a_baseline(demo_audits):
    true_audit, pred_audit = f"{demo_audits}/audit-test-true", f"{demo_audits}/audit-test-pred"
    index = write_report(pred_audit, per_class=2, baseline=true_audit)
    summary = json.loads(Path(index).with_name("diff").joinpath("diff_summary.json").read_text())
    truth = pq.read_table(f"{true_audit}/scores.parquet").to_pylist()
    mistakes = sum(row["pred_last"] != row["label_true"] for row in truth)
    assert summary["match_on"] == "key"
    assert summary["counts"]["common"] == len(truth) and summary["counts"]["added"] == 0
    assert summary["counts"]["label_changed"] == mistakes
    assert -1 <= summary["spearman"] <= 1
    assert re.search(r"<b>\d+</b>label changed", Path(index).read_text())
