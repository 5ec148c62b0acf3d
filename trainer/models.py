"""Model architectures, with the training-time preprocessing inside the graph.

Every model starts with ``Standardize`` (mean and std fitted on the training split, stored as
buffers), so the exported ONNX/TFLite graph takes raw feature values: an agent feeding what the
source data holds gets the trainer's predictions. A CNN also reshapes the flat feature vector to
its image inside the graph.

``spec`` is a plain dict (kind, sizes) from which ``build`` recreates the module; pruning
changes the spec, so a checkpoint always says which shapes its tensors have. A ``torch`` kind
spec names the user's module function, and trainer.kinds.user_module rebuilds it; its network
sits after the same ``Standardize`` layer (``UserNet``).

Regression (``spec["task"] == "regression"``): the network has one output and learns the
standardized target; ``ValueServing`` maps it back (y * std + mean, with the training split's
target mean and std from the spec), so the exported graph returns the value in the target's
units as a float32 [n, 1] tensor.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

__all__ = [
    "CNN",
    "MLP",
    "Serving",
    "Standardize",
    "UserNet",
    "ValueServing",
    "build",
    "count_parameters",
    "fit_scaler",
    "serving",
]


class Standardize(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=0))
        # Constant features (blank pixels) would divide by zero: leave them unscaled.
        std = x.std(dim=0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    def __init__(self, features: int, hidden: list[int], classes: int) -> None:
        super().__init__()
        self.scale = Standardize(features)
        widths = [features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.out = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale(x)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class CNN(nn.Module):
    def __init__(
        self, features: int, image: tuple[int, int], channels: list[int], hidden: int,
        classes: int,
    ) -> None:
        super().__init__()
        if image[0] * image[1] != features:
            raise ValueError(f"image {image} does not hold {features} features")
        self.image = image
        self.scale = Standardize(features)
        ins = [1, *channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(ins, channels, strict=False)
        )
        self.pool = nn.MaxPool2d(2)
        pooled = (image[0] // 2) * (image[1] // 2)
        self.fc = nn.Linear(channels[-1] * pooled, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale(x).reshape(-1, 1, self.image[0], self.image[1])
        for conv in self.convs:
            x = torch.relu(conv(x))
        x = self.pool(x).flatten(1)
        return self.out(torch.relu(self.fc(x)))


class Serving(nn.Module):
    """What gets exported: raw features in, class probabilities out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)


class ValueServing(nn.Module):
    """What gets exported for regression: raw features in, the value [n, 1] out."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).reshape(-1, 1) * self.std + self.mean


class UserNet(nn.Module):
    """The user's network (kind "torch") after the trainer's input standardization."""

    def __init__(self, features: int, net: nn.Module) -> None:
        super().__init__()
        self.scale = Standardize(features)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.scale(x))


def serving(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The exported form of ``model``: probabilities, or the value in the target's units."""
    if spec.get("task", "classification") == "regression":
        return ValueServing(model.cpu(), spec["target_mean"], spec["target_std"]).eval()
    return Serving(model.cpu()).eval()


def build(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] == "mlp":
        return MLP(spec["features"], list(spec["hidden"]), spec["classes"])
    if spec["kind"] == "cnn":
        return CNN(spec["features"], tuple(spec["image"]), list(spec["channels"]),
                   spec["hidden"][0], spec["classes"])
    raise ValueError(f"unknown model kind {spec['kind']!r}")


def fit_scaler(model: nn.Module, x: torch.Tensor) -> None:
    """Fit the model's input standardization on training rows."""
    scale = model.get_submodule("scale")
    if not isinstance(scale, Standardize):
        raise TypeError(f"{type(model).__name__} has no Standardize input layer")
    scale.fit(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
