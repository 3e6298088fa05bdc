"""Checkpoint formats, ordering and the checks that run before any scoring."""

import io

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from vog_ray.checkpoints import (
    CheckpointError, build_models, read_checkpoints, resolve_checkpoint_urls,
)
from vog_ray.demo_model import digits_cnn

MODEL = "vog_ray.demo_model:digits_cnn"


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _formats(state):
    scripted = torch.jit.script(_loaded(state))
    script_buffer = io.BytesIO()
    torch.jit.save(scripted, script_buffer)
    return {
        "plain.pt": _torch_bytes(state),
        "wrapped_state_dict.pt": _torch_bytes({"state_dict": state, "epoch": 3}),
        "wrapped_model.pt": _torch_bytes({"model": state}),
        "wrapped_model_state_dict.pt": _torch_bytes({"model_state_dict": state, "step": 9}),
        "ddp.pt": _torch_bytes({f"module.{k}": v for k, v in state.items()}),
        "lightning.ckpt": _torch_bytes({"state_dict": {f"model.{k}": v for k, v in state.items()}}),
        "weights.safetensors": save_safetensors({k: v.contiguous() for k, v in state.items()}),
        "scripted.pt": script_buffer.getvalue(),
    }


def _loaded(state):
    model = digits_cnn(10)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("name", list(_formats(digits_cnn(10).state_dict())))
def test_each_format_loads_to_the_same_network(tmp_path, name):
    torch.manual_seed(0)
    state = digits_cnn(10).state_dict()
    (tmp_path / name).write_bytes(_formats(state)[name])
    (tmp_path / "plain_ref.pt").write_bytes(_torch_bytes(state))
    checkpoints = read_checkpoints([str(tmp_path / name), str(tmp_path / "plain_ref.pt")])
    loaded, reference = build_models(checkpoints, MODEL, 10)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(loaded(x), reference(x))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_other_number_of_classes_fails_naming_the_file(tmp_path):
    path = tmp_path / "epoch_2.pt"
    path.write_bytes(_torch_bytes(digits_cnn(7).state_dict()))
    with pytest.raises(CheckpointError, match=r"epoch_2\.pt.*shape mismatch.*\(7, 1024\)"):
        build_models(read_checkpoints([str(path)]), MODEL, 10)


def test_checkpoints_are_ordered_by_the_numbers_in_their_names(tmp_path):
    for step in (1000, 900, 50):
        (tmp_path / f"step_{step}.pt").write_bytes(b"x")
    urls = resolve_checkpoint_urls([str(tmp_path / "step_*.pt")])
    assert [u.rsplit("/", 1)[1] for u in urls] == ["step_50.pt", "step_900.pt", "step_1000.pt"]


def test_fewer_than_two_checkpoints_is_refused(tmp_path):
    (tmp_path / "only.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="at least 2"):
        resolve_checkpoint_urls([str(tmp_path / "*.pt")])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "was_executed"
    path = tmp_path / "evil.pt"
    path.write_bytes(_torch_bytes({"state_dict": _Payload(str(marker))}))
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        build_models(read_checkpoints([str(path)]), MODEL, 10)
    assert not marker.exists()


def test_corrupt_and_missing_files_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(_torch_bytes(digits_cnn(10).state_dict())[:200])
    with pytest.raises(CheckpointError, match=r"corrupt\.pt"):
        build_models(read_checkpoints([str(corrupt)]), MODEL, 10)
    with pytest.raises(CheckpointError, match=r"nowhere\.pt does not exist"):
        read_checkpoints([str(tmp_path / "nowhere.pt")])


def test_random_bytes_are_reported_as_unreadable_never_as_code(tmp_path):
    """Random files make torch.load raise many types; each becomes one message naming the file."""
    rng = np.random.default_rng(7)
    reasons = set()
    for number in range(60):
        path = tmp_path / f"random_{number}.pt"
        path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError) as caught:
            build_models(read_checkpoints([str(path)]), MODEL, 10)
        message = str(caught.value)
        assert f"random_{number}.pt is not a readable PyTorch" in message
        assert "run code" not in message
        reasons.add(message.split("(")[1].split(":")[0].split(")")[0])
    assert len(reasons) >= 2, reasons  # more than one kind of torch failure was met and named
