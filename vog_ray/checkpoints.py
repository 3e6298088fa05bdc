"""Find, read, load and check training checkpoints, and build the K frozen models from them."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from natsort import natsorted
from torch import nn

from vog_ray import storage
from vog_ray.models import build_model

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "model.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass
class Checkpoint:
    """One checkpoint's URL, raw bytes and fingerprint."""

    url: str
    data: bytes
    sha256: str

    @property
    def record(self) -> dict[str, Any]:
        return {"url": self.url, "size": len(self.data), "sha256": self.sha256}


def resolve_checkpoint_urls(patterns: list[str], storage_options: dict | None = None) -> list[str]:
    """Expand checkpoint patterns and order them by the numbers in their names."""
    urls = natsorted(storage.expand_urls(patterns, storage_options), key=os.path.basename)
    if len(urls) < 2:
        raise CheckpointError(
            f"VoG needs at least 2 checkpoints; --checkpoints {patterns!r} matches "
            f"{len(urls)}{'' if urls == list(patterns) else f': {urls}'}"
        )
    return urls


def read_checkpoints(urls: list[str], storage_options: dict | None = None) -> list[Checkpoint]:
    """Read every checkpoint's bytes once, naming the file that cannot be read."""
    checkpoints = []
    for url in urls:
        try:
            data = storage.read_bytes(url, storage_options)
        except FileNotFoundError as error:
            raise CheckpointError(f"checkpoint {url} does not exist; check the path") from error
        except OSError as error:
            detail = storage.scrub(f"{type(error).__name__}: {error}", storage_options)
            raise CheckpointError(
                f"cannot read checkpoint {url} ({detail}); check the path and the credentials"
            ) from error
        checkpoints.append(Checkpoint(url, data, hashlib.sha256(data).hexdigest()))
    return checkpoints


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_size,) = struct.unpack("<Q", data[:8])
    return 0 < header_size <= len(data) - 8 and data[8:9] == b"{"


def _is_torchscript(data: bytes) -> bool:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def load_checkpoint(data: bytes, url: str) -> dict[str, torch.Tensor] | torch.jit.ScriptModule:
    """A state dict (wrappers and DDP/Lightning prefixes removed) or a TorchScript module.

    Pickles are read with ``weights_only=True``: a checkpoint that carries code is refused.
    """
    try:
        if _is_safetensors(data):
            from safetensors.torch import load as load_safetensors

            return _strip_prefixes(load_safetensors(data))
        if _is_torchscript(data):
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = _global_line(error)
        if code is None:
            raise _unreadable(url, error) from error
        raise CheckpointError(
            f"checkpoint {url} holds objects other than tensors and was refused, since loading "
            "it would run code from the file. Re-save it as a plain state_dict "
            f"(torch.save(model.state_dict(), path)) or as safetensors. Detail: {code}"
        ) from error
    except Exception as error:  # noqa: BLE001 - random bytes make torch.load raise any type
        raise _unreadable(url, error) from error
    return _strip_prefixes(_unwrap(loaded, url))


def _global_line(error: BaseException) -> str | None:
    """The line of a weights-only refusal that names the code the pickle would import."""
    return next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)


def _unreadable(url: str, error: BaseException) -> CheckpointError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, pickle.UnpicklingError):
        detail = next((line for line in lines if line.startswith("Unsupported")), "bad pickle")
    else:
        detail = _first_line(error)
    name = type(error).__name__
    cause = name if detail == name else f"{name}: {detail}"
    return CheckpointError(
        f"checkpoint {url} is not a readable PyTorch, safetensors or TorchScript file "
        f"({cause}); is it truncated, corrupt or of another format?"
    )


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def _unwrap(loaded: Any, url: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                return loaded[key]
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded
    found = list(loaded)[:10] if isinstance(loaded, dict) else type(loaded).__name__
    raise CheckpointError(
        f"checkpoint {url} is not a state_dict nor a dict holding one under "
        f"{', '.join(_WRAPPER_KEYS)}; top-level keys: {found}"
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return dict(state)


def build_models(
    checkpoints: list[Checkpoint], model_spec: str | None, num_classes: int | None
) -> list[nn.Module]:
    """The K models, in eval mode with frozen parameters, checked against their checkpoints."""
    models = [_model_for(c, model_spec, num_classes) for c in checkpoints]
    for model in models:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return models


def _model_for(
    checkpoint: Checkpoint, model_spec: str | None, num_classes: int | None
) -> nn.Module:
    loaded = load_checkpoint(checkpoint.data, checkpoint.url)
    if isinstance(loaded, torch.jit.ScriptModule):
        return loaded
    if model_spec is None:
        raise CheckpointError(
            f"checkpoint {checkpoint.url} is a state_dict, so --model is needed to build the "
            "network"
        )
    model = build_model(model_spec, num_classes)
    expected = model.state_dict()
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    mismatched = _shape_mismatches(expected, loaded)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            _mismatch_message(checkpoint.url, model_spec, missing, unexpected, mismatched)
        )
    model.load_state_dict(loaded)
    return model


def _shape_mismatches(expected: dict, state: dict[str, torch.Tensor]) -> list[str]:
    return [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]


def _mismatch_message(url: str, spec: str, missing, unexpected, mismatched: list[str]) -> str:
    parts = []
    if mismatched:
        parts.append(f"shape mismatch in {len(mismatched)} tensors ({'; '.join(mismatched[:5])})")
    if missing:
        parts.append(f"missing keys {missing[:8]}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:8]}")
    return (f"checkpoint {url} does not fit model {spec}: {'; '.join(parts)}. Check --model and "
            "--num-classes, and that the file belongs to this run")
