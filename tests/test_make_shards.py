"""make_shards: keys, labels, class list, bad-file list, determinism and shard splitting."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from vog_ray import make_shards as ms


def _image_bytes(fmt: str, seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(root: Path, relpath: str, data: bytes) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


GOOD = {
    "cat/img1.png": ("PNG", "cat/img1", 0),
    "cat/img2.png": ("PNG", "cat/img2", 0),
    "cat/img10.png": ("PNG", "cat/img10", 0),
    "cat/photo.v1.JPG": ("JPEG", "cat/photo_v1", 0),
    "dog/a.jpeg": ("JPEG", "dog/a", 1),
    "dog/b.webp": ("WEBP", "dog/b", 1),
    "dog/sub/c.ppm": ("PPM", "dog/sub/c", 1),
    "emu/x.y.png": ("PNG", "emu/x_y", 2),
}
BAD = {
    "cat/broken.png": ms.NOT_AN_IMAGE,
    "cat/truncated.jpg": ms.NOT_AN_IMAGE,
    "dog/notes.txt": ms.UNKNOWN_EXTENSION,
    "dog/fake.jpg": ms.NOT_AN_IMAGE,
    "dog/.DS_Store": ms.HIDDEN,
    "emu/x_y.png": ms.KEY_COLLISION,
    "stray.png": ms.OUTSIDE_CLASS_FOLDER,
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Three classes of small images, plus one file for each way a file can be rejected."""
    root = tmp_path / "tree"
    for seed, (relpath, (fmt, _, _)) in enumerate(GOOD.items()):
        _write(root, relpath, _image_bytes(fmt, seed))
    _write(root, "cat/broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    _write(root, "cat/truncated.jpg", _image_bytes("JPEG", 99, size=64)[:300])
    _write(root, "dog/notes.txt", b"not an image")
    _write(root, "dog/fake.jpg", b"plain text with an image extension")
    _write(root, "dog/.DS_Store", b"\x00\x00")
    _write(root, "emu/x_y.png", _image_bytes("PNG", 50))
    _write(root, "stray.png", _image_bytes("PNG", 51))
    return root


def _read_samples(urls: list[str]) -> list[dict]:
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return list(dataset)


def _tar_members(url: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(url) as archive:
        return [(info, archive.extractfile(info).read()) for info in archive.getmembers()]


def _tar_size(members: list[tuple[tarfile.TarInfo, bytes]]) -> int:
    """Size of a tar stream holding these members, written the way the shards are."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data))
    return len(buffer.getvalue())


def _digest(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
    }


def test_sample_key_replaces_dots_and_round_trips_through_webdataset() -> None:
    assert ms.sample_key("cat/img.v1.png") == "cat/img_v1"
    assert ms.sample_key("./v1.0/a b.JPG") == "v1_0/a b"
    assert ms.sample_key("bucket/../x.png") == "bucket/__/x"
    key = ms.sample_key("a.b/c.d.e.png")
    assert base_plus_ext(f"{key}.png") == (key, "png")


def test_folder_tree_keys_labels_and_bytes(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = ms.make_shards(str(tree), str(out))

    samples = _read_samples(summary.shards)
    keys = [sample["__key__"] for sample in samples]
    expected_order = ["cat/img1", "cat/img2", "cat/img10", "cat/photo_v1",
                      "dog/a", "dog/b", "dog/sub/c", "emu/x_y"]
    assert keys == expected_order
    by_key = {sample["__key__"]: sample for sample in samples}
    for relpath, (_, key, label) in GOOD.items():
        extension = relpath.rsplit(".", 1)[1].lower()
        assert int(by_key[key]["cls"]) == label
        assert by_key[key][extension] == (tree / relpath).read_bytes()
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "emu"]
    assert summary.classes == ["cat", "dog", "emu"]
    assert summary.samples == len(GOOD)
    assert summary.class_counts == [4, 3, 1]
    assert summary.shards == [f"{out}/shard-000000.tar"]


def test_bad_files_are_listed_with_reasons(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = ms.make_shards(str(tree), str(out))

    listed = json.loads((out / "bad_files.json").read_text())
    assert {entry["path"]: entry["reason"] for entry in listed} == BAD
    assert all(entry["message"] for entry in listed)
    assert summary.bad_files == len(BAD)
    assert summary.samples + summary.bad_files == len(GOOD) + len(BAD)
    assert sum(summary.bad_reasons.values()) == len(BAD)
    collision = next(entry for entry in listed if entry["reason"] == ms.KEY_COLLISION)
    assert "emu/x.y.png" in collision["message"]


def test_two_runs_write_identical_files(tree: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    ms.make_shards(str(tree), str(first), max_samples_per_shard=3)
    ms.make_shards(str(tree), str(second), max_samples_per_shard=3, workers=1)
    assert _digest(first) == _digest(second)


def test_shards_split_by_size_and_keep_order(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for index in range(12):
        size = 24 + 8 * (index % 4)
        _write(root, f"c{index % 2}/img{index}.png", _image_bytes("PNG", index, size=size))
    limit = 3 * tarfile.RECORDSIZE
    whole = ms.make_shards(str(root), str(tmp_path / "whole"))
    split = ms.make_shards(str(root), str(tmp_path / "split"), shard_size_bytes=limit)

    assert len(whole.shards) == 1 and len(split.shards) > 2
    sizes = [Path(url).stat().st_size for url in split.shards]
    assert all(size <= limit for size in sizes)
    assert split.bytes_written == sum(sizes)
    per_shard = [_tar_members(url) for url in split.shards]
    for index, members in enumerate(per_shard):
        assert members, "no empty shard"
        assert _tar_size(members) == sizes[index]
        if index + 1 < len(per_shard):
            next_sample = per_shard[index + 1][:2]
            assert _tar_size(members + next_sample) > limit, "a shard was closed too early"
    split_keys = [sample["__key__"] for sample in _read_samples(split.shards)]
    assert split_keys == [sample["__key__"] for sample in _read_samples(whole.shards)]


def test_max_samples_per_shard(tree: Path, tmp_path: Path) -> None:
    summary = ms.make_shards(str(tree), str(tmp_path / "out"), max_samples_per_shard=3)
    counts = [len(_read_samples([url])) for url in summary.shards]
    assert counts == [3, 3, 2]
    assert [Path(url).name for url in summary.shards] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_one_sample_larger_than_the_limit_gets_its_own_shard(tree: Path, tmp_path: Path) -> None:
    summary = ms.make_shards(str(tree), str(tmp_path / "out"), shard_size_bytes=1)
    assert len(summary.shards) == len(GOOD)


def test_csv_with_class_names(tree: Path, tmp_path: Path) -> None:
    table = tree / "labels.csv"
    table.write_text(
        "path,label\n"
        "cat/img2.png,kitten\n"
        "dog/a.jpeg,puppy\n"
        f"{tree / 'cat/img1.png'},kitten\n"
        "dog/b.webp,\n"
        "dog/missing.png,puppy\n"
    )
    out = tmp_path / "out"
    summary = ms.make_shards(str(table), str(out))

    samples = _read_samples(summary.shards)
    keys = [sample["__key__"] for sample in samples]
    absolute_key = ms.sample_key(str(tree / "cat/img1.png").lstrip("/"))
    assert keys == ["cat/img2", "dog/a", absolute_key]
    assert [int(sample["cls"]) for sample in samples] == [0, 1, 0]
    assert json.loads((out / "classes.json").read_text()) == ["kitten", "puppy"]
    listed = {entry["path"]: entry["reason"] for entry in
              json.loads((out / "bad_files.json").read_text())}
    assert listed == {"dog/b.webp": ms.MISSING_LABEL, "dog/missing.png": ms.UNREADABLE}


def test_parquet_with_integer_labels(tree: Path, tmp_path: Path) -> None:
    table = tmp_path / "labels.parquet"
    pq.write_table(pa.table({
        "path": [str(tree / "cat/img1.png"), str(tree / "dog/a.jpeg"), str(tree / "cat/img2.png")],
        "label": pa.array([3, 1, -1], pa.int64()),
    }), table)
    out = tmp_path / "out"
    summary = ms.make_shards(str(table), str(out))

    labels = [int(sample["cls"]) for sample in _read_samples(summary.shards)]
    assert labels == [3, 1]
    assert json.loads((out / "classes.json").read_text()) == ["0", "1", "2", "3"]
    assert summary.bad_reasons == {ms.INVALID_LABEL: 1}


def test_table_without_the_columns_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("file,class\na.png,cat\n")
    with pytest.raises(ms.MakeShardsError, match="path,label"):
        ms.make_shards(str(table), str(tmp_path / "out"))


def test_fsspec_urls_for_source_and_output(tree: Path) -> None:
    memory = fsspec.filesystem("memory")
    for relpath in GOOD:
        memory.pipe(f"/src-tree/{relpath}", (tree / relpath).read_bytes())
    try:
        summary = ms.make_shards("memory://src-tree", "memory://shards", max_samples_per_shard=5)
        assert summary.shards == ["memory://shards/shard-000000.tar",
                                  "memory://shards/shard-000001.tar"]
        names = []
        for url in summary.shards:
            with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle) as archive:
                names += archive.getnames()
        assert "dog/sub/c.ppm" in names and "cat/photo_v1.jpg" in names
        assert json.loads(memory.cat("/shards/classes.json")) == ["cat", "dog", "emu"]
        assert json.loads(memory.cat("/shards/bad_files.json")) == []
    finally:
        memory.rm("/src-tree", recursive=True)
        memory.rm("/shards", recursive=True)


def test_existing_shards_need_overwrite(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ms.make_shards(str(tree), str(out), max_samples_per_shard=1)
    with pytest.raises(ms.MakeShardsError, match="overwrite"):
        ms.make_shards(str(tree), str(out))
    summary = ms.make_shards(str(tree), str(out), overwrite=True)
    assert sorted(path.name for path in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert len(summary.shards) == 1


def test_nothing_storable_raises_after_listing_why(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _write(root, "cat/a.txt", b"text")
    out = tmp_path / "out"
    with pytest.raises(ms.MakeShardsError, match="bad_files.json"):
        ms.make_shards(str(root), str(out))
    assert json.loads((out / "bad_files.json").read_text())[0]["reason"] == ms.UNKNOWN_EXTENSION


def test_source_that_is_neither_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ms.MakeShardsError, match="neither"):
        ms.make_shards(str(tmp_path / "absent"), str(tmp_path / "out"))


def test_command_line(tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    ms.register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    argv = ["make-shards", str(tree), str(out), "--shard-size-mb", "0.05", "--max-samples", "2"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert len(list(out.glob("shard-*.tar"))) == 4
    assert "not stored" in caplog.text
    assert args.func(args) == 2
    assert "overwrite" in caplog.text
    with pytest.raises(SystemExit):
        parser.parse_args(["make-shards", str(tree), str(out), "--max-samples", "0"])


def test_registered_in_the_vog_ray_command() -> None:
    from vog_ray.cli import build_parser

    args = build_parser().parse_args(["make-shards", "in", "out", "--shard-size-mb", "1"])
    assert args.func is ms.run_make_shards
    assert args.shard_size_mb == 1.0 and args.max_samples is None
