"""Input gradients of one batch at K checkpoints, folded straight into VoG accumulators."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vog_ray.config import CHECKPOINT_BATCHING
from vog_ray.stats import VogAccumulator


@dataclass
class GradientOptions:
    """How the gradient is taken: which label, which target, how channels are reduced."""

    label: str = "true"
    target: str = "logit"
    channels: str = "mean"
    precision: str = "fp32"


@dataclass
class BatchScores:
    """Everything one batch yields, one row per example, on the device of the batch."""

    raw: dict[str, torch.Tensor]
    labels: torch.Tensor
    preds: torch.Tensor
    margin_last: torch.Tensor
    loss_last: torch.Tensor
    finite: torch.Tensor

    def cpu(self) -> "BatchScores":
        """The same scores on the CPU; tensors already there are not copied."""
        return BatchScores(
            raw={name: tensor.cpu() for name, tensor in self.raw.items()},
            labels=self.labels.cpu(), preds=self.preds.cpu(),
            margin_last=self.margin_last.cpu(), loss_last=self.loss_last.cpu(),
            finite=self.finite.cpu(),
        )


class Checkpoints:
    """The K frozen models of an audit, prepared once to score many batches.

    ``loop`` runs the K models one after the other, each with its own backward pass. ``vmap``
    stacks their parameters and buffers (``torch.func.stack_module_state``) and runs all K in one
    vectorized forward (``functional_call`` under ``vmap``) on the batch repeated K times, then
    takes every input gradient with one ``autograd.grad``. It needs K plain ``nn.Module`` of one
    architecture (not TorchScript) and holds the activations of all K at once.
    """

    def __init__(self, models: list[nn.Module], *, batching: str = "loop",
                 compile: bool = False) -> None:
        if batching not in CHECKPOINT_BATCHING:
            raise ValueError(f"batching must be one of {CHECKPOINT_BATCHING}, got {batching!r}")
        for model in models:
            model.eval()
        self.count = len(models)
        self.batching = batching
        self.models: list[nn.Module] = []
        self._stacked: Callable[[torch.Tensor], torch.Tensor] | None = None
        if batching == "vmap":
            self._stacked = _stacked_forward(models)
            if compile:
                self._stacked = torch.compile(self._stacked)
        else:
            self.models = [torch.compile(m) for m in models] if compile else list(models)

    def __len__(self) -> int:
        return self.count

    def gradient_maps(self, images: torch.Tensor, labels_true: torch.Tensor,
                      options: GradientOptions, head: "LastCheckpoint"
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """(checkpoint index, channel-reduced input gradient) in :func:`checkpoint_order`.

        Fills ``head`` (predictions of every checkpoint, the label used, margin and loss of the
        last checkpoint) before the first map is yielded.
        """
        if self._stacked is None:
            return self._looped_maps(images, labels_true, options, head)
        return self._vmapped_maps(images, labels_true, options, head)

    def _looped_maps(self, images, labels_true, options, head):
        num = self.count
        for index in checkpoint_order(num):
            inputs = images.detach().requires_grad_(True)
            with _autocast(images.device, options.precision):
                logits = self.models[index](inputs)
            head.preds[:, index] = logits.argmax(dim=1)
            if index == num - 1:
                head.record(logits, labels_true, options.label)
            target = target_of(logits, head.labels, options.target)
            (grad,) = torch.autograd.grad(target.sum(), inputs)
            yield index, reduce_channels(at_least_fp32(grad), options.channels)

    def _vmapped_maps(self, images, labels_true, options, head):
        num = self.count
        inputs = images.detach().expand(num, *images.shape).requires_grad_(True)
        with _autocast(images.device, options.precision):
            logits = self._stacked(inputs)
        head.preds.copy_(logits.argmax(dim=2).T)
        head.record(logits[num - 1], labels_true, options.label)
        target = target_of(logits.flatten(0, 1), head.labels.repeat(num), options.target)
        (grad,) = torch.autograd.grad(target.sum(), inputs)
        grad = at_least_fp32(grad)
        for index in checkpoint_order(num):
            yield index, reduce_channels(grad[index], options.channels)


def _stacked_forward(models: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(K, B, ...) inputs -> (K, B, classes) logits, checkpoint k on inputs[k]."""
    scripted = [type(m).__name__ for m in models if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ValueError("checkpoint batching 'vmap' needs nn.Module checkpoints, not "
                         "TorchScript; use 'loop'")
    params, buffers = torch.func.stack_module_state(models)
    params = {name: value.detach() for name, value in params.items()}
    skeleton = copy.deepcopy(models[0]).to("meta").eval()

    def one(param, buffer, inputs):
        return torch.func.functional_call(skeleton, (param, buffer), (inputs,))

    batched = torch.vmap(one)
    return lambda inputs: batched(params, buffers, inputs)


@dataclass
class LastCheckpoint:
    """Predictions at every checkpoint, and what the last checkpoint decides for the batch."""

    preds: torch.Tensor
    labels: torch.Tensor | None = None
    margin_last: torch.Tensor | None = None
    loss_last: torch.Tensor | None = None

    def record(self, logits: torch.Tensor, labels_true: torch.Tensor, label: str) -> None:
        """Take the label (true, or the last checkpoint's prediction), margin and loss."""
        self.labels = logits.argmax(dim=1) if label == "pred" else labels_true
        self.margin_last, self.loss_last = _margin_and_loss(logits.detach(), self.labels)


def checkpoint_order(num_checkpoints: int) -> list[int]:
    """The last checkpoint goes first: its prediction is the label under ``--label pred``."""
    return [num_checkpoints - 1, *range(num_checkpoints - 1)]


def target_of(logits: torch.Tensor, labels: torch.Tensor, target: str) -> torch.Tensor:
    """Per-example scalar whose input gradient is taken: logit, softmax probability or loss."""
    logits = at_least_fp32(logits)
    if target == "logit":
        return logits.gather(1, labels[:, None])[:, 0]
    if target == "prob":
        return logits.softmax(dim=1).gather(1, labels[:, None])[:, 0]
    return F.cross_entropy(logits, labels, reduction="none")


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16 and fp16 values in fp32; fp32 and fp64 unchanged."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def reduce_channels(grad: torch.Tensor, channels: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) by the channel mean, or unchanged with ``keep``."""
    return grad.mean(dim=1) if channels == "mean" else grad


def score_batch(
    models: list[nn.Module] | Checkpoints,
    images: torch.Tensor,
    labels_true: torch.Tensor,
    windows: dict[str, tuple[int, int]],
    options: GradientOptions,
) -> BatchScores:
    """Fold the K input-gradient maps of a batch into one accumulator per window.

    ``models`` is a list of K models (scored one after the other) or a :class:`Checkpoints`.
    Models are put in eval mode here, so that examples never interact through batch statistics
    and Dropout is off; parameters should be frozen, so only the input gradient is computed.
    The scores stay on the device of ``images``: call ``.cpu()`` once they are needed there.
    """
    checkpoints = models if isinstance(models, Checkpoints) else Checkpoints(list(models))
    size, device = images.shape[0], images.device
    accumulators = {name: VogAccumulator() for name in windows}
    head = LastCheckpoint(torch.empty((size, len(checkpoints)), dtype=torch.int64, device=device))
    finite = torch.ones(size, dtype=torch.bool, device=device)
    for index, maps in checkpoints.gradient_maps(images, labels_true, options, head):
        finite &= maps.flatten(1).isfinite().all(dim=1)
        for name, (start, stop) in windows.items():
            if start <= index < stop:
                accumulators[name].update(maps)
    return BatchScores(
        raw={name: acc.raw_scores() for name, acc in accumulators.items()},
        labels=head.labels, preds=head.preds, margin_last=head.margin_last,
        loss_last=head.loss_last, finite=finite,
    )


def _margin_and_loss(logits: torch.Tensor, labels: torch.Tensor):
    logits = logits.double()
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    loss = F.cross_entropy(logits, labels, reduction="none")
    return own - others, loss


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
