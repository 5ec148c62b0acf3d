"""Structured pruning: remove whole hidden units and conv channels (smaller tensors, no masks).

A unit's importance is the L2 norm of its incoming weights times that of its outgoing weights;
the lowest ``fraction`` of each layer's units go, and the next layer loses the matching input
columns. The result is a new, smaller model built from an updated spec.

A user's network (kind "torch") is pruned where the same rule is safe without knowing the
code: in each ``nn.Sequential``, a ``Linear`` followed (through elementwise activations or
dropout only) by another ``Linear`` loses hidden units; every other layer is left as is and
named in the recipe with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainer.models import CNN, MLP, build

__all__ = ["prune", "prune_sequential"]

# Modules that act on each unit separately: a unit removed before one is removed after it too.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Dropout, nn.Identity)


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


def prune_sequential(model: nn.Module, fraction: float) -> tuple[nn.Module, dict[str, Any]]:
    """Prune Linear -> (elementwise)* -> Linear chains inside every nn.Sequential of a copy of
    ``model``; returns it and {"linear_shapes": {path: [out, in]}, "pruned": [paths],
    "skipped": [{"module": path, "reason": ...}]}."""
    model = copy.deepcopy(model).cpu()
    pruned: list[str] = []
    chained: set[str] = set()
    shapes: dict[str, list[int]] = {}
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq.named_children())
        for i, (name, layer) in enumerate(items):
            if not isinstance(layer, nn.Linear):
                continue
            j = i + 1
            while j < len(items) and isinstance(items[j][1], _ELEMENTWISE):
                j += 1
            if j >= len(items) or not isinstance(items[j][1], nn.Linear):
                continue
            nxt_name, nxt = items[j]
            cur = getattr(seq, name)  # may have lost input columns already
            assert isinstance(cur, nn.Linear) and isinstance(nxt, nn.Linear)
            keep = _keep(cur.weight.detach().norm(dim=1) * nxt.weight.detach().norm(dim=0),
                         fraction)
            setattr(seq, name, _linear_any(cur, keep, None))
            setattr(seq, nxt_name, _linear_any(nxt, None, keep))
            prefix = f"{seq_name}." if seq_name else ""
            pruned.append(f"{prefix}{name}")
            chained.update({f"{prefix}{name}", f"{prefix}{nxt_name}"})
    for path, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            shapes[path] = [layer.out_features, layer.in_features]
    skipped = [
        {"module": path, "type": type(layer).__name__,
         "reason": "a Linear outside a Linear -> (activation) -> Linear chain of an "
                   "nn.Sequential (pruning it would change the network's input or output)"
         if isinstance(layer, nn.Linear) else "only Linear layers are pruned in torch modules"}
        for path, layer in model.named_modules()
        if path and not list(layer.children()) and path not in chained
        and (isinstance(layer, nn.Linear) or any(True for _ in layer.parameters(recurse=False)))
        and not path.startswith("scale")
    ]
    return model, {"linear_shapes": shapes, "pruned": pruned, "skipped": skipped}


def _linear_any(layer: nn.Linear, rows: torch.Tensor | None,
                cols: torch.Tensor | None) -> nn.Linear:
    """``_linear`` for a Linear that may have no bias."""
    if layer.bias is not None:
        return _linear(layer, rows, cols)
    w = layer.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        new.weight.copy_(w)
    return new
