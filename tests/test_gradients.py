"""Every scoring option against a NumPy transcription, on gradients the test controls.

A linear model has logit_j(x) = W_j . x + b_j, so its input gradients are known in closed form:
the logit's is W_y, the softmax probability's p_y (W_y - sum_j p_j W_j) and the cross-entropy's
sum_j p_j W_j - W_y.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vog_ray.config import parse_windows
from vog_ray.gradients import GradientOptions, score_batch
from vog_ray.demo_model import digits_cnn

C, H, W, CLASSES, K = 3, 4, 5, 6, 9


def linear_models(seed=0):
    torch.manual_seed(seed)
    models = []
    for _ in range(K):
        model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, CLASSES)).double().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
    return models


def closed_form_grads(models, x, labels, target):
    """(K, N, C, H, W) input gradients of the chosen target, in NumPy."""
    out = []
    for model in models:
        weights = model[1].weight.numpy().reshape(CLASSES, C, H, W)
        logits = x.reshape(len(x), -1) @ model[1].weight.numpy().T + model[1].bias.numpy()
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        own = weights[labels]
        mixed = np.einsum("nj,jchw->nchw", p, weights)
        if target == "logit":
            out.append(own)
        elif target == "prob":
            out.append(p[np.arange(len(x)), labels][:, None, None, None] * (own - mixed))
        else:
            out.append(mixed - own)
    return np.stack(out)


def numpy_vog(maps):
    k = maps.shape[0]
    mu = maps.sum(0) / k
    return np.sqrt(((maps - mu) ** 2).sum(0) / k).reshape(maps.shape[1], -1).mean(1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, C, H, W)), rng.integers(0, CLASSES, size=8)


@pytest.mark.parametrize("target", ["logit", "prob", "loss"])
@pytest.mark.parametrize("channels", ["mean", "keep"])
def test_targets_and_channels_match_numpy(batch, target, channels):
    x, labels = batch
    models = linear_models()
    windows = parse_windows("early=0:3,middle=3:6,late=6:9", K)
    result = score_batch(models, torch.from_numpy(x), torch.from_numpy(labels), windows,
                         GradientOptions(target=target, channels=channels))
    grads = closed_form_grads(models, x, labels, target)
    maps = grads.mean(axis=2) if channels == "mean" else grads
    for name, (start, stop) in windows.items():
        np.testing.assert_allclose(result.raw[name].numpy(), numpy_vog(maps[start:stop]),
                                   rtol=1e-9, atol=1e-15)


def test_window_mean_is_over_its_own_checkpoints(batch):
    """The published pitfall: a window's sum divided by the window length, over all checkpoints."""
    x, labels = batch
    models = linear_models(1)
    windows = parse_windows("late=6:9", K)
    result = score_batch(models, torch.from_numpy(x), torch.from_numpy(labels), windows,
                         GradientOptions())
    maps = closed_form_grads(models, x, labels, "logit").mean(axis=2)
    wrong_mean = maps.sum(0) / 3
    wrong = np.sqrt(((maps[6:9] - wrong_mean) ** 2).sum(0) / 3).reshape(8, -1).mean(1)
    got = result.raw["late"].numpy()
    np.testing.assert_allclose(got, numpy_vog(maps[6:9]), rtol=1e-9)
    assert np.all(np.abs(got - wrong) > 1e-3 * np.abs(got))


def test_label_pred_uses_the_last_checkpoint_prediction(batch):
    x, _ = batch
    models = linear_models(2)
    unknown = torch.full((8,), -1)
    result = score_batch(models, torch.from_numpy(x), unknown, parse_windows("", K),
                         GradientOptions(label="pred"))
    predicted = models[-1](torch.from_numpy(x)).argmax(1).numpy()
    assert result.labels.tolist() == predicted.tolist()
    maps = closed_form_grads(models, x, predicted, "logit").mean(axis=2)
    np.testing.assert_allclose(result.raw["all"].numpy(), numpy_vog(maps), rtol=1e-9)


def _per_example_reference(models, x, labels, *, train):
    """Gradients one example at a time, the models in the mode asked for."""
    maps = []
    for model in models:
        model.train(train)
        rows = []
        for i in range(len(x)):
            xi = x[i:i + 1].clone().requires_grad_(True)
            model(xi)[0, labels[i]].backward()
            rows.append(xi.grad[0].mean(0).numpy())
        maps.append(np.stack(rows))
    return numpy_vog(np.stack(maps).astype(np.float64))


def test_models_left_in_train_mode_are_scored_in_eval_mode(tmp_path):
    from vog_ray.checkpoints import build_models, read_checkpoints

    torch.manual_seed(0)
    paths = []
    for t in range(3):
        model = digits_cnn(10)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        paths.append(str(tmp_path / f"c{t}.pt"))
        torch.save(model.state_dict(), paths[-1])
    models = build_models(read_checkpoints(paths), "vog_ray.demo_model:digits_cnn", 10)
    x = torch.randn(6, 3, 16, 16)
    labels = torch.arange(6) % 10
    in_eval = _per_example_reference(models, x, labels, train=False)
    torch.manual_seed(1)
    in_train = _per_example_reference(copy.deepcopy(models), x, labels, train=True)
    assert not np.allclose(in_train, in_eval, rtol=1e-2)
    for model in models:
        model.train()  # as a caller might leave them
    result = score_batch(models, x, labels, {"all": (0, 3)}, GradientOptions())
    np.testing.assert_allclose(result.raw["all"].numpy(), in_eval, rtol=1e-4)
    assert not any(model.training for model in models)
