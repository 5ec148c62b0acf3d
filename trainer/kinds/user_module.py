"""The user's PyTorch network (``[model] kind = "torch"``): find, digest, import and build it.

``module = "PATH.py:function"`` names a file relative to the pipeline file;
``"package.module:function"`` an importable module. ``function(features, outputs)`` must return
an ``nn.Module`` mapping a float tensor [n, features] to [n, outputs] (outputs = the number of
classes, or 1 for regression). The trainer puts its ``Standardize`` layer in front
(trainer.models.UserNet).

Running the user's code is the point of this kind (the pipeline file's author chose it), but
whatever it does wrong - a missing file or function, an exception, a return value that is not an
``nn.Module``, a wrong output shape - becomes one ``InvalidInputError`` line naming the module.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from fleetcore.errors import InvalidInputError

__all__ = ["MAX_MODULE_BYTES", "build_user_net", "call_user_function", "module_file",
           "module_sha256"]

MAX_MODULE_BYTES = 4 * 1024 * 1024


def _split(ref: str) -> tuple[str, str]:
    target, _, function = ref.rpartition(":")
    return target, function


def module_file(ref: str, base_dir: Path) -> Path:
    """The source file behind ``ref`` (found without running it, except for parent packages
    of a dotted name, which Python imports to find the module)."""
    target, _ = _split(ref)
    if target.endswith(".py"):
        path = Path(target)
        path = (path if path.is_absolute() else base_dir / path).resolve()
        if not path.is_file():
            raise InvalidInputError(f"model.module = {ref!r}: no such file {path}")
        return path
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:
        raise InvalidInputError(f"model.module = {ref!r}: cannot find {target!r}: {exc}") from None
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        raise InvalidInputError(f"model.module = {ref!r}: no module {target!r} on the Python path")
    return Path(spec.origin)


def module_sha256(ref: str, base_dir: Path) -> str:
    path = module_file(ref, base_dir)
    size = path.stat().st_size
    if size > MAX_MODULE_BYTES:
        raise InvalidInputError(
            f"model.module = {ref!r}: {path} is {size} bytes; the limit is {MAX_MODULE_BYTES}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_function(ref: str, base_dir: Path) -> Any:
    target, function = _split(ref)
    path = module_file(ref, base_dir)
    try:
        if target.endswith(".py"):
            name = "edgefleet_user_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as exc:  # the user's code may raise anything
        raise InvalidInputError(
            f"model.module = {ref!r}: importing {path.name} raised {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise InvalidInputError(f"model.module = {ref!r}: {path.name} has no function "
                                f"{function!r}")
    return fn


def call_user_function(ref: str, base_dir: Path, features: int, outputs: int) -> Any:
    """``function(features, outputs)``, checked to be an nn.Module of the right output shape."""
    import torch
    from torch import nn

    fn = _load_function(ref, base_dir)
    try:
        net = fn(features, outputs)
    except Exception as exc:
        raise InvalidInputError(
            f"model.module = {ref!r}: calling it with (features={features}, outputs={outputs}) "
            f"raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(net, nn.Module):
        raise InvalidInputError(
            f"model.module = {ref!r} returned {type(net).__name__}, not a torch.nn.Module")
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, features))
    except Exception as exc:
        raise InvalidInputError(
            f"model.module = {ref!r}: the network fails on a [2, {features}] input: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, outputs):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidInputError(
            f"model.module = {ref!r}: the network maps [2, {features}] to {shape}; expected "
            f"[2, {outputs}] (outputs = {'1 value' if outputs == 1 else f'{outputs} classes'})"
        )
    return net.train()


def build_user_net(spec: dict[str, Any]) -> Any:
    """Rebuild a trained "torch" kind model from its spec (the file's digest must match)."""
    from trainer.models import UserNet

    base_dir = Path(spec["base_dir"])
    if module_sha256(spec["module"], base_dir) != spec["module_sha256"]:
        raise InvalidInputError(
            f"model.module = {spec['module']!r} changed since the model was trained; run the "
            "train step again (`trainer train` or `trainer run`)"
        )
    net = call_user_function(spec["module"], base_dir, spec["features"], spec["classes"])
    model = UserNet(spec["features"], net)
    _resize_linears(model, spec.get("linear_shapes", {}))
    return model


def _resize_linears(model: Any, shapes: dict[str, list[int]]) -> None:
    """Give the Linear layers that pruning shrank their pruned shapes ([out, in])."""
    from torch import nn

    for path, (out_f, in_f) in shapes.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, name)
        setattr(parent, name, nn.Linear(in_f, out_f, bias=old.bias is not None))
