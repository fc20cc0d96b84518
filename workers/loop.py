"""The training loop, in the pytorch-examples shape.

``fit`` is a plain function: it gets loaders, a device, an optional checkpoint to
resume from and ``Hooks`` that persist each epoch. A fresh start and a resume run
through the same code; a resume only loads state first.

The loop turns on what ``workers.device.Speedups`` chooses for the device; DataLoader
workers and pinned memory belong to the loaders (``workers.loader.ShardLoader``).
Running metrics accumulate on the device, so a step never waits for the host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import StopRequested
from workers.device import PLAIN, Speedups
from workers.models import PAD, ModelConfig, build_model, decode, greedy

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger(__name__)


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


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             cfg: ModelConfig, fast: Speedups) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, loss) of a uint8 batch ``x`` against labels ``y`` on ``device``."""
    with fast.autocast(device):
        logits = model(fast.inputs(x, device, cfg))
    # The loss (CTC included) in fp32, as autocast would keep it.
    logits = logits.float()
    return logits, _loss(logits, y, cfg)


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
        y = y.to(device, non_blocking=True)
        logits, loss = forward_loss(model, x, y, device, cfg, fast)
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
        y = y.to(device, non_blocking=True)
        logits, loss = forward_loss(model, x, y, device, cfg, fast)
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


class Hooks:
    """What :func:`fit` reports as it trains, and how it is told to stop. The base
    does nothing: a bare loop. A train job's recorder persists each epoch."""

    # Exceptions (a soft time limit) after which the position is checkpointed.
    interrupts: tuple[type[BaseException], ...] = ()

    def should_stop(self) -> bool:
        """Checked between batches: True stops with StopRequested after a checkpoint."""
        return False

    def on_batch(self, n: int) -> None:
        """After each batch of ``n`` samples, in training and evaluation."""

    def on_epoch(self, epoch: int, train: dict[str, float], val: dict[str, Any],
                 checkpoint: dict[str, Any]) -> None:
        """After epoch ``epoch`` (from 1): its metrics and the checkpoint that resumes
        after it."""

    def on_interrupt(self, checkpoint: dict[str, Any]) -> None:
        """Mid-epoch, before a stop or an interrupt leaves: the position reached."""


@dataclass
class FitResult:
    model: nn.Module
    test: dict[str, Any]
    resumed_from: int | None


@dataclass
class _State:
    """The model, optimizer and schedule of a fit, and where it resumes."""

    net: nn.Module  # holds the weights that checkpoints keep
    model: nn.Module  # runs the steps: ``net``, or its compiled wrapper
    opt: torch.optim.Optimizer
    sched: Any
    cfg: ModelConfig
    start: int = 0
    skip: int = 0  # batches of epoch ``start`` trained already

    def checkpoint(self, epochs_done: int, batch: int) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": epochs_done,
            "batch": batch,  # batches of the next epoch already trained
            "rng": torch.get_rng_state(),
            "config": self.cfg.to_dict(),
        }


def _prepare(cfg: ModelConfig, train: Any, epochs: int, lr: float, device: torch.device,
             fast: Speedups, resume: dict[str, Any] | None) -> _State:
    net = build_model(cfg).to(device)
    if fast.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # A compiled module's state_dict keys carry a prefix: ``net`` keeps the weights.
    model: nn.Module = torch.compile(net) if fast.compiled else net  # type: ignore[assignment]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * train.steps_per_epoch(), pct_start=0.2)
    state = _State(net, model, opt, sched, cfg)
    if resume is not None:
        net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        state.start, state.skip = int(resume["epoch"]), int(resume.get("batch", 0))
    return state


def _batches(train: Any, epoch: int, done: list[int], hooks: Hooks) -> Iterator[Any]:
    """The batches of ``epoch`` from ``done[0]`` on, counting each one trained."""
    # Asking for batch k+1 means batch k is fully trained: count it, then check for a
    # stop before starting the next one.
    for item in islice(train.epoch(epoch), done[0], None):
        if hooks.should_stop():
            raise StopRequested(f"stopped at epoch {epoch + 1}, batch {done[0]}")
        yield item
        done[0] += 1


def fit(
    cfg: ModelConfig,
    *,
    train: Any,
    val: Any,
    test: Any,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
    resume: dict[str, Any] | None = None,
    hooks: Hooks | None = None,
    compile: bool = False,
    precision: str = "auto",
) -> FitResult:
    """Train for ``epochs`` (from the checkpoint's position when resuming), then test.

    ``train``/``val``/``test`` have an ``epoch(e)`` method yielding batches in an
    order fixed by (seed, epoch); ``train`` also has ``steps_per_epoch()``, a bound
    on its batches that sizes the one-cycle schedule. ``hooks`` persist each epoch
    and say when to stop (:class:`Hooks`); the checkpoint they get is a plain dict
    that ``resume`` accepts back. A stop (StopRequested) or one of
    ``hooks.interrupts`` mid-epoch checkpoints the position (epoch, batch) first.

    ``Speedups.for_device`` chooses what the device runs fast (``precision``: auto,
    fp32 or bf16); ``compile`` adds ``torch.compile`` on any device.
    Each epoch's train metrics also hold ``samples_per_s`` (samples trained per
    second of the epoch's training pass, data loading included), the speedups as
    0/1 and the train loader's ``loader_workers`` and ``pin_memory``.
    """
    hooks = hooks or Hooks()
    torch.manual_seed(seed)
    fast = Speedups.for_device(device, compile, precision)
    if fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    st = _prepare(cfg, train, epochs, lr, device, fast, resume)
    loader_info = {"loader_workers": float(getattr(train, "workers", 0)),
                   "pin_memory": float(getattr(train, "pin_memory", False))}
    log.info("training on %s: %s", device, ", ".join(
        f"{k} {'on' if v else 'off'}" if k != "loader_workers" else f"{k} {v:.0f}"
        for k, v in {**fast.metrics(), **loader_info}.items()))
    stops: tuple[type[BaseException], ...] = (StopRequested, *hooks.interrupts)
    for epoch in range(st.start, epochs):
        done = [st.skip if epoch == st.start else 0]
        try:
            t0 = time.perf_counter()
            tr = train_one_epoch(st.model, _batches(train, epoch, done, hooks), st.opt,
                                 st.sched, device, cfg, hooks.on_batch, fast)
            seconds = time.perf_counter() - t0
        except stops:
            hooks.on_interrupt(st.checkpoint(epoch, done[0]))
            raise
        tr = {**tr, "samples_per_s": tr["samples"] / max(seconds, 1e-9),
              **fast.metrics(), **loader_info}
        va = evaluate(st.model, val.epoch(0), device, cfg, hooks.on_batch, fast=fast)
        hooks.on_epoch(epoch + 1, tr, va, st.checkpoint(epoch + 1, 0))
    result = evaluate(st.model, test.epoch(0), device, cfg, hooks.on_batch, confusion=True,
                      fast=fast)
    return FitResult(model=st.net, test=result, resumed_from=st.start if resume else None)
