"""Build the network named by ``--model``."""

from __future__ import annotations

import importlib
import inspect

from torch import nn


class ModelSpecError(ValueError):
    """A ``--model`` value that cannot be built."""


def build_model(spec: str, num_classes: int | None) -> nn.Module:
    """An untrained network from ``torchvision:NAME`` or ``package.module:callable``.

    ``num_classes`` is passed to the constructor when it accepts one.
    """
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelSpecError(
            f"--model {spec!r} is not of the form torchvision:NAME or package.module:callable"
        )
    if source == "torchvision":
        return _torchvision_model(name, num_classes)
    return _imported_model(source, name, num_classes)


def _torchvision_model(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelSpecError(
            f"torchvision has no model {name!r}; see torchvision.models.list_models()"
        )
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return torchvision.models.get_model(name, **kwargs)


def _imported_model(module_name: str, attribute: str, num_classes: int | None) -> nn.Module:
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelSpecError(f"cannot import {module_name}:{attribute}: {error}") from error
    accepts = "num_classes" in inspect.signature(factory).parameters
    model = factory(num_classes=num_classes) if accepts and num_classes is not None else factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{module_name}:{attribute} returned {type(model).__name__}, not an nn.Module"
        )
    return model
