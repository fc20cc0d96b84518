"""The training loop, in the pytorch-examples shape.

``fit`` is a plain function: it gets loaders, a device, an optional checkpoint to
resume from and an ``on_epoch`` callback that persists each epoch. A fresh start and
a resume run through the same code; a resume only loads state first.

On a CUDA device the loop also uses bf16 autocast, channels_last memory and
``cudnn.benchmark``, and optionally ``torch.compile`` (``Speedups``); DataLoader
workers and pinned memory belong to the loaders (``workers.data.ShardLoader``). Other
devices run exactly the plain loop. Running metrics accumulate on the device, so a
step never waits for the host.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ConfigError
from workers.data import normalize
from workers.models import PAD, ModelConfig, build_model, decode, greedy
from workers.shutdown import StopRequested

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speedups:
    """What the loop turns on beyond the plain path; recorded with each epoch's train
    metrics (as 0/1) and in the worker's log."""

    bf16: bool = False  # autocast to bfloat16 (CUDA): forward and loss
    channels_last: bool = False  # NHWC memory for the model and its inputs
    cudnn_benchmark: bool = False  # cuDNN picks the fastest kernels per input shape
    compiled: bool = False  # torch.compile of the model

    @classmethod
    def for_device(cls, device: torch.device, compile: bool = False) -> Speedups:
        """All of them on CUDA; on any other device only ``compile``, if asked."""
        cuda = device.type == "cuda"
        return cls(bf16=cuda, channels_last=cuda, cudnn_benchmark=cuda, compiled=compile)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def inputs(self, x: torch.Tensor, device: torch.device, cfg: ModelConfig) -> torch.Tensor:
        """uint8 batch -> normalized float on ``device``: the copy moves bytes, not floats."""
        x = normalize(x.to(device, non_blocking=True), cfg)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


PLAIN = Speedups()


def pick_device(want: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for ``auto``; raises ConfigError if ``want`` is absent."""
    if want == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but this worker has no CUDA GPU")
    if want == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for, but this worker has no MPS device")
    return torch.device(want)


def _loss(logits: torch.Tensor, y: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if cfg.ctc:
        # logits (B, T, C+1) with the blank at 0; y (B, L) padded with PAD. Targets in
        # the padded (B, L) form stay on the device (no host sync); past each length
        # the values are ignored.
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C+1)
        lengths = (y != PAD).sum(1)
        targets = torch.where(y == PAD, 0, y + 1)
        steps = torch.full((len(y),), log_probs.shape[0], dtype=torch.long, device=y.device)
        return F.ctc_loss(log_probs, targets, steps, lengths, blank=0, zero_infinity=True)
    # logits (B, L, C), y (B, L): the sum over heads, averaged over the batch
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD) * y.shape[1]


def _hits(logits: torch.Tensor, y: torch.Tensor, cfg: ModelConfig
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predictions (B, L), per-position hits (B, L), where the text has a char (B, L))."""
    pred, _ = decode(logits, cfg)
    y = y.cpu()
    valid = y != PAD
    return pred, (pred == y) & valid, valid


def _char_acc(hit: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) fraction of each text's characters read right, by position."""
    return hit.sum(1).float() / valid.sum(1).clamp(min=1).float()


def train_one_epoch(
    model: nn.Module,
    loader: Batches,
    opt: torch.optim.Optimizer,
    sched: Any,
    device: torch.device,
    cfg: ModelConfig,
    on_batch: Callable[[int], None] | None = None,
    fast: Speedups = PLAIN,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, running char/seq accuracy and the
    number of samples trained."""
    model.train()
    # samples, loss sum, characters right (per-text fractions), texts right
    sums = torch.zeros(4, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                       device=device)
    for x, y in loader:
        x = fast.inputs(x, device, cfg)
        y = y.to(device, non_blocking=True)
        with fast.autocast(device):
            logits = model(x)
            loss = _loss(logits, y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        n = len(y)
        with torch.no_grad():
            pred, _ = greedy(logits, cfg)
            valid = y != PAD
            hit = (pred == y) & valid
            sums[0] += n
            sums[1] += loss.detach() * n
            sums[2] += _char_acc(hit, valid).sum()
            sums[3] += (pred == y).all(1).sum()
        if on_batch is not None:
            on_batch(n)
    samples, loss_sum, char_ok, seq_ok = sums.tolist()
    total = max(samples, 1)
    return {"loss": loss_sum / total, "char_acc": char_ok / total, "seq_acc": seq_ok / total,
            "samples": samples}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Batches, device: torch.device, cfg: ModelConfig,
    on_batch: Callable[[int], None] | None = None, confusion: bool = False,
    fast: Speedups = PLAIN,
) -> dict[str, Any]:
    """Loss, per-character, per-position and whole-sequence accuracy over ``loader``.

    With ``confusion``, also ``confusion``: per position, a C×C list of counts
    (row: true class, column: predicted), and ``missing``: characters the model did
    not emit at all (a CTC reading shorter than the text).
    """
    model.eval()
    total = 0
    loss_sum = char_sum = 0.0
    n_classes = len(cfg.charset)
    pos_ok = torch.zeros(cfg.length)
    pos_n = torch.zeros(cfg.length)
    seq_ok = missing = 0
    matrix = torch.zeros(cfg.length, n_classes, n_classes, dtype=torch.long)
    for x, y in loader:
        x = fast.inputs(x, device, cfg)
        y = y.to(device, non_blocking=True)
        with fast.autocast(device):
            logits = model(x)
            loss = _loss(logits, y, cfg)
        pred, hit, valid = _hits(logits, y, cfg)
        yc = y.cpu()
        total += len(y)
        loss_sum += loss.item() * len(y)
        char_sum += _char_acc(hit, valid).sum().item()
        pos_ok += hit.float().sum(0)
        pos_n += valid.float().sum(0)
        seq_ok += int((pred == yc).all(1).sum())
        if confusion:
            emitted = valid & (pred != PAD)
            missing += int((valid & (pred == PAD)).sum())
            pos = torch.arange(cfg.length).expand_as(yc)[emitted]
            flat = (pos * n_classes + yc[emitted]) * n_classes + pred[emitted]
            matrix += torch.bincount(flat, minlength=matrix.numel()).view_as(matrix)
        if on_batch is not None:
            on_batch(len(y))
    n = max(total, 1)
    out: dict[str, Any] = {
        "loss": loss_sum / n,
        "char_acc": char_sum / n,
        "seq_acc": seq_ok / n,
        "per_position": (pos_ok / pos_n.clamp(min=1)).tolist(),
        "count": total,
    }
    if confusion:
        out["confusion"] = matrix.tolist()
        out["missing"] = missing
    return out


@dataclass
class FitResult:
    model: nn.Module
    test: dict[str, Any]
    resumed_from: int | None


def fit(
    cfg: ModelConfig,
    *,
    train: Any,
    val: Any,
    test: Any,
    train_count: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float], dict[str, float], dict[str, Any]], None],
    on_batch: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_interrupt: Callable[[dict[str, Any]], None] | None = None,
    interrupts: tuple[type[BaseException], ...] = (),
    compile: bool = False,
) -> FitResult:
    """Train for ``epochs`` (from the checkpoint's position when resuming), then test.

    ``train``/``val``/``test`` have an ``epoch(e)`` method yielding batches in an
    order fixed by (seed, epoch). ``on_epoch(epoch, train_metrics, val_metrics,
    checkpoint)`` persists each epoch; the checkpoint is a plain dict that ``resume``
    accepts back. When ``should_stop()`` turns true between batches, or one of
    ``interrupts`` (a soft time limit) is raised mid-epoch, ``on_interrupt`` gets a
    checkpoint of the position reached (epoch, batch) before the exception leaves;
    StopRequested is raised for ``should_stop``.

    On CUDA the ``Speedups`` are on; ``compile`` adds ``torch.compile`` on any device.
    Each epoch's train metrics also hold ``samples_per_s`` (samples trained per
    second of the epoch's training pass, data loading included), the speedups as
    0/1 and the train loader's ``loader_workers`` and ``pin_memory``.
    """

    torch.manual_seed(seed)
    fast = Speedups.for_device(device, compile)
    if fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    net = build_model(cfg).to(device)
    if fast.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # The compiled wrapper runs the steps; ``net`` holds the weights that checkpoints
    # and the result keep (a compiled module's state_dict keys carry a prefix).
    model: nn.Module = torch.compile(net) if compile else net  # type: ignore[assignment]
    loader_info = {"loader_workers": float(getattr(train, "workers", 0)),
                   "pin_memory": float(getattr(train, "pin_memory", False))}
    log.info("training on %s: %s", device, ", ".join(
        f"{k} {'on' if v else 'off'}" if k != "loader_workers" else f"{k} {v:.0f}"
        for k, v in {**fast.metrics(), **loader_info}.items()))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    # The loader batches within groups of shards, so each group may end on a partial
    # batch: count one extra step per group, or OneCycleLR would run out of steps.
    groups = math.ceil(len(getattr(train, "shards", [None])) / getattr(train, "mix", 1))
    steps_per_epoch = max(1, math.ceil(train_count / batch_size) + groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
    )
    start, skip = 0, 0
    if resume is not None:
        net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        start, skip = int(resume["epoch"]), int(resume.get("batch", 0))

    def checkpoint(epochs_done: int, batch: int) -> dict[str, Any]:
        return {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": epochs_done,
            "batch": batch,  # batches of the next epoch already trained
            "rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
        }

    for epoch in range(start, epochs):
        done = [skip if epoch == start else 0]

        def batches(epoch: int = epoch, done: list[int] = done) -> Iterator[Any]:
            # Asking for batch k+1 means batch k is fully trained: count it, then
            # check for a stop before starting the next one.
            for item in islice(train.epoch(epoch), done[0], None):
                if should_stop is not None and should_stop():
                    raise StopRequested(f"stopped at epoch {epoch + 1}, batch {done[0]}")
                yield item
                done[0] += 1

        try:
            t0 = time.perf_counter()
            tr = train_one_epoch(model, batches(), opt, sched, device, cfg, on_batch, fast)
            seconds = time.perf_counter() - t0
        except BaseException as exc:
            if on_interrupt is not None and isinstance(exc, (StopRequested, *interrupts)):
                on_interrupt(checkpoint(epoch, done[0]))
            raise
        tr = {**tr, "samples_per_s": tr["samples"] / max(seconds, 1e-9),
              **fast.metrics(), **loader_info}
        va = evaluate(model, val.epoch(0), device, cfg, on_batch, fast=fast)
        on_epoch(epoch + 1, tr, va, checkpoint(epoch + 1, 0))
    result = evaluate(model, test.epoch(0), device, cfg, on_batch, confusion=True, fast=fast)
    return FitResult(model=net, test=result, resumed_from=start if resume else None)
