"""User errors end in one message and exit code 1, not a traceback; window specs are checked."""

import logging

import numpy as np
import pytest

from vog_ray import demo
from vog_ray.cli import main
from vog_ray.config import ConfigError, parse_windows


def test_window_specs_resolve_with_slice_rules():
    assert parse_windows("thirds", 9) == {"all": (0, 9), "early": (0, 3), "middle": (3, 6),
                                          "late": (6, 9)}
    assert parse_windows("early=:4,late=-4:", 10) == {"all": (0, 10), "early": (0, 4),
                                                      "late": (6, 10)}


@pytest.mark.parametrize("spec, checkpoints, message", [
    ("a=0:3,a=3:6", 6, r"window names must differ; \['a'\]"),
    ("thirds", 3, r"covers 1 of the 3 checkpoints.*'thirds' needs at least 6"),
    ("all=0:3", 6, "reserved"),
    ("early", 6, "write name=start:stop"),
])
def test_bad_window_specs_are_refused(spec, checkpoints, message):
    with pytest.raises(ConfigError, match=message):
        parse_windows(spec, checkpoints)


def _score_args(digits, checkpoints, output, *extra):
    return ["score", "--data", digits["shards"][0], "--checkpoints", *checkpoints,
            "--model", demo.MODEL, "--num-classes", "10", "--image-size", str(demo.IMAGE_SIZE),
            "--output", str(output), "--no-progress", *extra]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_corrupt_checkpoint_ends_the_command_with_its_message(digits, tmp_path, caplog,
                                                                 verbose):
    noise = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (tmp_path / "step_1.pt").write_bytes(noise)
    (tmp_path / "step_2.pt").write_bytes(noise[::-1])
    args = _score_args(digits, [str(tmp_path / "step_*.pt")], tmp_path / "out")
    with caplog.at_level(logging.ERROR, logger="vog_ray.cli"):
        code = main(["--verbose", *args] if verbose else args)
    assert code == 1
    [record] = [r for r in caplog.records if r.name == "vog_ray.cli"]
    assert record.getMessage().startswith(
        f"CheckpointError: checkpoint {tmp_path}/step_1.pt is not a readable PyTorch")
    assert bool(record.exc_info) is verbose
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_report_of_a_damaged_or_missing_audit_says_so(tmp_path, caplog):
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "manifest.json").write_text("not json")
    with caplog.at_level(logging.ERROR, logger="vog_ray.cli"):
        assert main(["report", str(tmp_path / "damaged")]) == 1
        assert main(["report", str(tmp_path / "nowhere")]) == 1
    damaged, missing = [r.getMessage() for r in caplog.records if r.name == "vog_ray.cli"]
    assert damaged.startswith(f"AuditUnreadable: {tmp_path}/damaged/manifest.json is not valid")
    assert missing.startswith(f"FileNotFoundError: {tmp_path}/nowhere/manifest.json is missing")
