"""Input gradients of one batch at K checkpoints, folded straight into VoG accumulators."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    """Everything one batch yields; tensors on the CPU, one row per example."""

    raw: dict[str, torch.Tensor]
    labels: torch.Tensor
    preds: torch.Tensor
    margin_last: torch.Tensor
    loss_last: torch.Tensor
    finite: torch.Tensor


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
    models: list[nn.Module],
    images: torch.Tensor,
    labels_true: torch.Tensor,
    windows: dict[str, tuple[int, int]],
    options: GradientOptions,
) -> BatchScores:
    """Fold the K input-gradient maps of a batch into one accumulator per window.

    Models are put in eval mode here, so that examples never interact through batch statistics
    and Dropout is off; parameters should be frozen, so only the input gradient is computed.
    """
    for model in models:
        model.eval()
    accumulators = {name: VogAccumulator() for name in windows}
    num = len(models)
    preds = torch.empty((images.shape[0], num), dtype=torch.int64, device=images.device)
    finite = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    labels = labels_true
    margin_last = loss_last = None
    for index in checkpoint_order(num):
        inputs = images.detach().requires_grad_(True)
        with _autocast(images.device, options.precision):
            logits = models[index](inputs)
        preds[:, index] = logits.argmax(dim=1)
        if index == num - 1:
            labels = preds[:, index] if options.label == "pred" else labels_true
            margin_last, loss_last = _margin_and_loss(logits.detach(), labels)
        (grad,) = torch.autograd.grad(target_of(logits, labels, options.target).sum(), inputs)
        maps = reduce_channels(at_least_fp32(grad), options.channels)
        finite &= maps.flatten(1).isfinite().all(dim=1)
        for name, (start, stop) in windows.items():
            if start <= index < stop:
                accumulators[name].update(maps)
    return BatchScores(
        raw={name: acc.raw_scores().cpu() for name, acc in accumulators.items()},
        labels=labels.cpu(), preds=preds.cpu(), margin_last=margin_last.cpu(),
        loss_last=loss_last.cpu(), finite=finite.cpu(),
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

