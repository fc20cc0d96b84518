"""The demo's size, planned from a short speed check so that it keeps its time
promise on a slow day: it renders a few captchas and times a few training steps of
the demo's model on this machine, then picks how many captchas to generate and how
many epochs to train.

Imports the worker side lazily (the demo runs the workers on this machine anyway).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

# What the demo aims for on a fast enough machine: 40,000 captchas (32,000 to train
# on) for 8 epochs reaches 0.99 whole-sequence accuracy (BENCHMARKS.md).
FULL_COUNT, FULL_EPOCHS = 40_000, 8
MIN_COUNT, MIN_EPOCHS = 8_000, 4  # below these the demo would show too little
TRAIN_SHARE = 0.8  # the default split's train fraction
# Seconds the demo spends outside generating and training: starting the workers,
# evaluating val each epoch and test at the end, reading fresh captchas.
OVERHEAD_S = 30.0
EVAL_SHARE = 0.12  # val and test evaluation, as a share of the training time


@dataclass(frozen=True)
class Plan:
    count: int
    epochs: int
    images_per_s: float  # synthesis, all cpu worker processes together
    samples_per_s: float  # training, the demo's model on this machine
    estimate_s: float  # the planned demo's wall time

    def describe(self) -> str:
        return (f"planned {self.count:,} captchas and {self.epochs} epochs from a speed check "
                f"({self.images_per_s:.0f} captchas/s, {self.samples_per_s:.0f} training "
                f"samples/s): about {self.estimate_s / 60:.1f} min")


def measure(seconds: float = 2.0) -> tuple[float, float]:
    """(captchas rendered per second by all cpu worker processes, training samples
    per second of the demo's model), each timed for about ``seconds``."""
    from workers.synth import render_items

    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        render_items(n, n, 16, "0123456789", 4, 160, 60)
        n += 16
    # The cpu worker runs one process per core; they scale almost linearly.
    images = n / (time.perf_counter() - t0) * (os.cpu_count() or 1)
    return images, _train_speed(seconds)


def _train_speed(seconds: float) -> float:
    import torch

    from shared.spec import TrainSpec, validate
    from workers.device import Speedups
    from workers.loop import forward_loss
    from workers.models import ModelConfig, build_model

    spec = validate(TrainSpec, dataset="demo")
    cfg = ModelConfig(charset="0123456789", length=4, in_height=30, in_width=80,
                      image_height=60, image_width=160)
    device = torch.device("cpu")
    fast = Speedups.for_device(device, precision=spec.precision)
    model = build_model(cfg)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    x = torch.randint(0, 256, (spec.batch_size, 1, 30, 80), dtype=torch.uint8)
    y = torch.randint(0, 10, (spec.batch_size, 4))
    done, t0 = 0, 0.0
    for step in range(10_000):
        if step == 2:  # after warming up
            t0 = time.perf_counter()
        _, loss = forward_loss(model, x, y, device, cfg, fast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += spec.batch_size if step >= 2 else 0
        if step >= 4 and time.perf_counter() - t0 > seconds:
            break
    return done / (time.perf_counter() - t0)


def estimate(count: int, epochs: int, images_per_s: float, samples_per_s: float) -> float:
    """The demo's wall time, seconds, for ``count`` captchas and ``epochs`` epochs."""
    train = epochs * count * TRAIN_SHARE / samples_per_s * (1 + EVAL_SHARE)
    return OVERHEAD_S + count / images_per_s + train


def plan(budget_s: float, images_per_s: float, samples_per_s: float) -> Plan:
    """The largest demo that fits ``budget_s``: the full size if it fits, else fewer
    epochs (down to MIN_EPOCHS), then fewer captchas (down to MIN_COUNT); the
    smallest if even that does not fit (the demo then says it is over budget)."""
    count, epochs = FULL_COUNT, FULL_EPOCHS
    while epochs > MIN_EPOCHS and estimate(count, epochs, images_per_s,
                                           samples_per_s) > budget_s:
        epochs -= 1
    while count > MIN_COUNT and estimate(count, epochs, images_per_s,
                                         samples_per_s) > budget_s:
        count = max(MIN_COUNT, int(count * 0.9) // 1000 * 1000)
    return Plan(count, epochs, images_per_s, samples_per_s,
                estimate(count, epochs, images_per_s, samples_per_s))
