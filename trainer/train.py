"""Deterministic PyTorch training with atomic per-epoch checkpoints and optional DDP.

* Determinism: the initial weights come from ``seed``; each epoch's order from a generator
  seeded with (seed, epoch), so a run resumed from a checkpoint replays exactly the batches an
  uninterrupted run would have seen and ends with the same weights.
* Checkpoints: after every epoch, the model, optimizer and epoch are written atomically (temp
  file, fsync, rename) together with the run's key; a checkpoint from other settings is ignored.
* Scale-out: under ``torchrun`` (WORLD_SIZE > 1) each process takes every WORLD_SIZE-th sample
  of the epoch's order with batch_size / WORLD_SIZE per step, so the global batch - and the
  result - match a single process; gloo on CPU, NCCL on CUDA. Rank 0 writes the files.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fleetcore.errors import InvalidInputError
from fleetcore.files import atomic_write
from trainer.dist import DistContext
from trainer.models import serving

__all__ = ["DistContext", "TrainOutcome", "accuracy", "fit", "pick_device", "predict",
           "predict_proba"]

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    epochs_run: int
    resumed_from: int  # epochs already done when this run started
    losses: list[float] = field(default_factory=list)


def pick_device(setting: str, ctx: DistContext) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InvalidInputError(
                "train.device = 'cuda' but no CUDA device is available; set device = 'cpu' or "
                "'auto' in [train]"
            )
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def _load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        log.info("ignoring checkpoint %s: made with other settings", path)
        return None
    return state


def _targets_and_loss(
    y: np.ndarray, target: tuple[float, float] | None, device: torch.device
) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Class ids under cross-entropy, or the standardized target under MSE."""
    if target is None:
        return torch.as_tensor(y, dtype=torch.long, device=device), nn.CrossEntropyLoss()
    ys = (torch.as_tensor(y, dtype=torch.float32, device=device) - target[0]) / target[1]
    mse = nn.MSELoss()

    def loss_fn(out: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        if out.numel() != want.numel():
            raise InvalidInputError(
                f"a regression model must give one value per row; it gave output of shape "
                f"{list(out.shape)} for {len(want)} rows"
            )
        return mse(out.reshape(-1), want)

    return ys, loss_fn


def fit(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    device: torch.device | None = None,
    checkpoint: Path | None = None,
    key: str = "",
    ctx: DistContext | None = None,
    progress: Callable[[str], None] | None = None,
    target: tuple[float, float] | None = None,
) -> TrainOutcome:
    """Train ``model`` in place on (X, y); resume from ``checkpoint`` when it matches ``key``.

    Classification (``target`` None): cross-entropy on class ids. Regression: ``target`` is
    the training target's (mean, std) and the model learns the standardized value under MSE
    (the exported graph maps it back, trainer.models.ValueServing)."""
    ctx = ctx or DistContext()
    device = device or torch.device("cpu")
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    start = 0
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, key)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
            if progress and ctx.is_main:
                progress(f"resuming after epoch {start}/{epochs} from {checkpoint}")
    net: nn.Module = model
    if ctx.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    xs = torch.as_tensor(X, dtype=torch.float32, device=device)
    ys, loss_fn = _targets_and_loss(y, target, device)
    n = len(xs) - len(xs) % ctx.world  # equal shares keep DDP ranks in lock-step
    per_rank = max(1, batch_size // ctx.world)
    outcome = TrainOutcome(epochs_run=0, resumed_from=start)
    tty = sys.stderr.isatty()
    for epoch in range(start, epochs):
        net.train()
        order = _epoch_order(len(xs), seed, epoch)[:n][ctx.rank :: ctx.world].to(device)
        total, batches = 0.0, 0
        steps = (len(order) + per_rank - 1) // per_rank
        for step in range(steps):
            idx = order[step * per_rank : (step + 1) * per_rank]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            if tty and ctx.is_main and progress:
                print(f"\r  epoch {epoch + 1}/{epochs} batch {step + 1}/{steps}", end="",
                      file=sys.stderr, flush=True)
        if tty and ctx.is_main and progress:
            print("\r", end="", file=sys.stderr)
        mean_loss = total / max(1, batches)
        outcome.losses.append(mean_loss)
        outcome.epochs_run += 1
        if checkpoint is not None and ctx.is_main:
            _save_checkpoint(checkpoint, {
                "key": key, "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
            })
        if ctx.world > 1:
            dist.barrier()
        if progress and ctx.is_main:
            progress(f"epoch {epoch + 1}/{epochs} loss {mean_loss:.4f}"
                     + (" (checkpoint saved)" if checkpoint is not None else ""))
    model.cpu()
    return outcome


@torch.no_grad()
def predict_proba(model: nn.Module, X: np.ndarray, batch: int = 4096) -> np.ndarray:
    model.eval()
    out = []
    xs = torch.as_tensor(X, dtype=torch.float32)
    for i in range(0, len(xs), batch):
        out.append(torch.softmax(model(xs[i : i + batch]), dim=1))
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(model, X).argmax(axis=1) == y).mean())


@torch.no_grad()
def predict(model: nn.Module, spec: dict[str, Any], X: np.ndarray,
            batch: int = 4096) -> np.ndarray:
    """What the exported model answers: probabilities, or values [n, 1] for regression."""
    wrapped = serving(model, spec)
    xs = torch.as_tensor(X, dtype=torch.float32)
    return torch.cat([wrapped(xs[i : i + batch]) for i in range(0, len(xs), batch)]).numpy()
