"""Structured pruning: remove whole hidden units and conv channels (smaller tensors, no masks).

A unit's importance is the L2 norm of its incoming weights times that of its outgoing weights;
the lowest ``fraction`` of each layer's units go, and the next layer loses the matching input
columns. The result is a new, smaller model built from an updated spec.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainer.models import CNN, MLP, build

__all__ = ["prune"]


def _keep(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    n = importance.numel()
    keep = max(1, round(n * (1.0 - fraction)))
    return torch.sort(torch.topk(importance, keep).indices).values


def _linear(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w, b = layer.weight.detach(), layer.bias.detach()
    if rows is not None:
        w, b = w[rows], b[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    return new


def _prune_mlp(model: MLP, spec: dict[str, Any], fraction: float) -> tuple[nn.Module, dict]:
    layers = [m for m in (*model.hidden, model.out) if isinstance(m, nn.Linear)]
    keeps: list[torch.Tensor] = []
    for i, layer in enumerate(layers[:-1]):
        incoming = layer.weight.detach().norm(dim=1)
        outgoing = layers[i + 1].weight.detach().norm(dim=0)
        keeps.append(_keep(incoming * outgoing, fraction))
    new_spec = {**spec, "hidden": [int(k.numel()) for k in keeps]}
    new = build(new_spec)
    assert isinstance(new, MLP)
    new.scale.load_state_dict(model.scale.state_dict())
    prev: torch.Tensor | None = None
    for i, layer in enumerate(layers[:-1]):
        new.hidden[i] = _linear(layer, keeps[i], prev)
        prev = keeps[i]
    new.out = _linear(model.out, None, prev)
    return new, new_spec


def _conv(layer: nn.Conv2d, outs: torch.Tensor, ins: torch.Tensor | None) -> nn.Conv2d:
    assert layer.bias is not None
    w, b = layer.weight.detach()[outs], layer.bias.detach()[outs]
    if ins is not None:
        w = w[:, ins]
    kh, kw = layer.kernel_size[0], layer.kernel_size[-1]
    pad = layer.padding if isinstance(layer.padding, str) else (layer.padding[0],
                                                                  layer.padding[-1])
    new = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=(kh, kw), padding=pad)
    with torch.no_grad():
        new.weight.copy_(w)
        assert new.bias is not None
        new.bias.copy_(b)
    return new


def _prune_cnn(model: CNN, spec: dict[str, Any], fraction: float) -> tuple[nn.Module, dict]:
    convs = [c for c in model.convs if isinstance(c, nn.Conv2d)]
    pooled = (model.image[0] // 2) * (model.image[1] // 2)
    keeps: list[torch.Tensor] = []
    for i, conv in enumerate(convs):
        incoming = conv.weight.detach().flatten(1).norm(dim=1)
        if i + 1 < len(convs):
            outgoing = convs[i + 1].weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
        else:  # the flatten feeds fc: channel c owns columns c*pooled .. (c+1)*pooled-1
            fc_w = model.fc.weight.detach().reshape(model.fc.out_features, -1, pooled)
            outgoing = fc_w.transpose(0, 1).flatten(1).norm(dim=1)
        keeps.append(_keep(incoming * outgoing, fraction))
    fc_keep = _keep(model.fc.weight.detach().norm(dim=1) * model.out.weight.detach().norm(dim=0),
                    fraction)
    new_spec = {**spec, "channels": [int(k.numel()) for k in keeps],
                "hidden": [int(fc_keep.numel())]}
    new = build(new_spec)
    assert isinstance(new, CNN)
    new.scale.load_state_dict(model.scale.state_dict())
    prev: torch.Tensor | None = None
    for i, conv in enumerate(convs):
        new.convs[i] = _conv(conv, keeps[i], prev)
        prev = keeps[i]
    assert prev is not None
    cols = (prev[:, None] * pooled + torch.arange(pooled)[None, :]).flatten()
    new.fc = _linear(model.fc, fc_keep, cols)
    new.out = _linear(model.out, None, fc_keep)
    return new, new_spec


def prune(model: nn.Module, spec: dict[str, Any], fraction: float) -> tuple[nn.Module, dict]:
    """Return a smaller copy of ``model`` without ``fraction`` of its units, and its spec."""
    if fraction <= 0:
        return copy.deepcopy(model), dict(spec)
    model = model.cpu()
    if isinstance(model, MLP):
        return _prune_mlp(model, spec, fraction)
    if isinstance(model, CNN):
        return _prune_cnn(model, spec, fraction)
    raise TypeError(f"cannot prune {type(model).__name__}")
