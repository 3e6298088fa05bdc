"""The resolved configuration of one audit, and parsing of training-stage windows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "npy")

LABEL_SOURCES = ("true", "pred")
TARGETS = ("logit", "prob", "loss")
CHANNEL_MODES = ("mean", "keep")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_BATCHING = ("loop", "vmap")
JPEG_DECODERS = ("auto", "cpu")

# Fields that change no score: left out of the fingerprint that guards a resumed audit.
_RUN_ONLY_FIELDS = (
    "num_workers", "overwrite", "storage_options", "max_error_rate", "strict", "prefetch",
    "threads_per_worker", "max_retries", "progress", "report", "device",
    # How the work is laid out; scores agree within docs/performance.md's tolerances.
    "checkpoint_batching", "jpeg_decode",
)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message says which and what to do."""


@dataclass
class ScoreConfig:
    """Everything that defines an audit. ``storage_options`` is never written anywhere."""

    data: list[str]
    checkpoints: list[str]
    output: str
    model: str | None = None
    num_classes: int | None = None
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_keys: tuple[str, ...] = IMAGE_EXTENSIONS
    label_key: str = "cls"
    batch_size: int = 64
    label: str = "true"
    target: str = "logit"
    channels: str = "mean"
    windows: str = ""
    precision: str = "fp32"
    compile: bool = False
    checkpoint_batching: str = "loop"
    device: str = "auto"
    jpeg_decode: str = "auto"
    num_workers: int | None = None
    threads_per_worker: int | None = None
    prefetch: int = 2
    max_error_rate: float = 0.01
    strict: bool = False
    overwrite: bool = False
    max_retries: int = 3
    progress: bool = True
    report: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        self.checkpoints = (
            [self.checkpoints] if isinstance(self.checkpoints, str) else list(self.checkpoints)
        )
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.image_keys = tuple(self.image_keys)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on any value outside what the engine supports."""
        _choice("label", self.label, LABEL_SOURCES)
        _choice("target", self.target, TARGETS)
        _choice("channels", self.channels, CHANNEL_MODES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _choice("checkpoint-batching", self.checkpoint_batching, CHECKPOINT_BATCHING)
        _choice("jpeg-decode", self.jpeg_decode, JPEG_DECODERS)
        if not self.data:
            raise ConfigError("--data is empty: give at least one shard URL or pattern")
        if not self.checkpoints:
            raise ConfigError("--checkpoints is empty: give at least 2 checkpoint URLs or a glob")
        if self.batch_size < 1 or self.image_size < 1:
            raise ConfigError("--batch-size and --image-size must be positive integers")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"--mean has {len(self.mean)} values but --std {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"--std values must be positive, got {self.std}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.model is None and self.num_classes is None and self.label == "true":
            pass  # TorchScript checkpoints need neither; checked once checkpoints are read.

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form without storage options (they may hold credentials)."""
        values = dataclasses.asdict(self)
        values.pop("storage_options")
        return values

    def fingerprint(self, checkpoint_hashes: list[str]) -> str:
        """Hash of everything that changes a score: the options and the checkpoints' contents."""
        values = {k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY_FIELDS}
        values["checkpoint_sha256"] = checkpoint_hashes
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")


_WINDOW_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)=(-?\d*):(-?\d*)$")


def parse_windows(spec: str, num_checkpoints: int) -> dict[str, tuple[int, int]]:
    """Resolve a window spec into {name: (start, stop)} checkpoint index ranges.

    ``spec`` is ``""`` (only ``all``), ``"thirds"`` (early, middle, late) or a comma list of
    ``name=start:stop`` with Python slice rules. ``all`` always covers every checkpoint.
    """
    windows = {"all": (0, num_checkpoints)}
    if not spec:
        return windows
    if spec == "thirds":
        cuts = [round(i * num_checkpoints / 3) for i in range(4)]
        named = {"early": (cuts[0], cuts[1]), "middle": (cuts[1], cuts[2]),
                 "late": (cuts[2], cuts[3])}
    else:
        pairs = [_parse_window(part, num_checkpoints) for part in spec.split(",")]
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"window names must differ; {repeated} appear more than once in "
                              f"{spec!r}")
        named = dict(pairs)
    for name, (start, stop) in named.items():
        if stop - start < 2:
            hint = " ('thirds' needs at least 6 checkpoints)" if spec == "thirds" else ""
            raise ConfigError(
                f"window {name!r} covers {stop - start} of the {num_checkpoints} checkpoints; "
                f"VoG needs at least 2 in every window{hint}"
            )
    windows.update(named)
    return windows


def _parse_window(part: str, num_checkpoints: int) -> tuple[str, tuple[int, int]]:
    match = _WINDOW_RE.match(part.strip())
    if not match:
        raise ConfigError(
            f"cannot read window {part!r}: write name=start:stop, e.g. early=0:3,late=6:9"
        )
    name, start, stop = match.group(1), match.group(2), match.group(3)
    if name == "all":
        raise ConfigError("the window name 'all' is reserved for the whole checkpoint list")
    begin, end, _ = slice(int(start) if start else None, int(stop) if stop else None).indices(
        num_checkpoints
    )
    return name, (begin, max(begin, end))
