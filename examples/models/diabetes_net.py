"""A user's own network for `examples/pipelines/diabetes-torch.toml`.

The trainer calls ``build(features, outputs)`` (outputs: the number of classes, or 1 for a
regression) and wraps the result with its input standardization; the module only needs to map
[n, features] to [n, outputs].
"""

from __future__ import annotations

from torch import nn


def build(features: int, outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, outputs),
    )
