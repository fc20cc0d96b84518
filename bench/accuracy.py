"""Accuracy of a preset on captchas drawn by the plain ``captcha`` package.

    python bench/accuracy.py --preset digits4 [--count N] [--epochs E] [--held-out 10000]

Generates the preset's dataset with the project's generate job, trains with the
preset through a real gpu-queue worker, then reads a held-out set made directly by
``ImageCaptcha(width, height).generate_image`` (not the project's seeded generator
path) with the stored model, and prints whole-sequence and per-character accuracy
and the wall time of each step. ``--count``/``--epochs`` shrink a run to estimate
its time before a full one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import (  # noqa: E402
    follow_run,
    held_out_accuracy,
    isolated_home,
    machine,
    workers,
)

HOME = isolated_home()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="digits4")
    ap.add_argument("--count", type=int, help="images to generate (default: the preset's)")
    ap.add_argument("--epochs", type=int, help="epochs (default: the preset's)")
    ap.add_argument("--held-out", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from scheduler import presets, watch
    from scheduler.plan import plan_generate, plan_train
    from shared.dispatch import send_job
    from shared.spec import GenerateSpec, TrainSpec, validate

    preset = presets.get(args.preset)
    gen_values = {**preset.generate_values(), **({"count": args.count} if args.count else {})}
    train_values = {**preset.train_values(), **({"epochs": args.epochs} if args.epochs else {})}
    gspec = validate(GenerateSpec, name=f"acc-{preset.name}", seed=args.seed, **gen_values)
    tspec = validate(TrainSpec, dataset=gspec.name, seed=args.seed, **train_values)
    print(f"machine: {machine()}", flush=True)
    print(f"preset {preset.name}: {gen_values}", flush=True)
    print(f"train spec: {tspec.model_dump()}", flush=True)

    t0 = time.monotonic()
    with workers("cpu", os.cpu_count() or 2, HOME):
        job_id, _ = plan_generate(gspec)
        send_job(job_id)
        assert watch.wait(job_id, Console(quiet=True), interval=0.5, quiet=True) == "done"
    gen_s = time.monotonic() - t0
    print(f"generated {gspec.count} images in {gen_s:.0f} s", flush=True)

    t1 = time.monotonic()
    with workers("gpu", 1, HOME):
        run_id, train_job = plan_train(tspec)
        send_job(train_job)

        def show(row: dict) -> None:
            print(f"  epoch {row['epoch']:>3}  {time.monotonic() - t1:6.0f} s  "
                  f"train loss {row.get('train_loss', 0):.4f} "
                  f"{row.get('train_samples_per_s', 0):.0f} samples/s  "
                  f"val seq_acc {row['val_seq_acc']:.4f} char_acc {row['val_char_acc']:.4f}",
                  flush=True)

        detail = follow_run(train_job, run_id, show, interval=5.0)
    train_s = time.monotonic() - t1
    if detail["status"] != "done":
        raise SystemExit(f"training {detail['status']}: {detail['error']}")
    test = detail["test"]
    print(f"trained {tspec.epochs} epochs in {train_s:.0f} s; project test split "
          f"({test['count']} images): seq_acc {test['seq_acc']:.4f} "
          f"char_acc {test['char_acc']:.4f}", flush=True)

    t2 = time.monotonic()
    held = held_out_accuracy(run_id, args.held_out, gspec.charset,
                             gspec.length, gspec.width, gspec.height, seed=args.seed + 1000)
    print(f"held-out, plain ImageCaptcha({gspec.width},{gspec.height}).generate_image, "
          f"{held['count']} images: seq_acc {held['seq_acc']:.4f} "
          f"char_acc {held['char_acc']:.4f} ({time.monotonic() - t2:.0f} s)")
    verdict = "reached" if held["seq_acc"] >= preset.target else "missed"
    print(f"target {preset.target:.3f}: {verdict}")
    print(f"wall time: {time.monotonic() - t0:.0f} s (generate {gen_s:.0f} s, "
          f"train {train_s:.0f} s)")


if __name__ == "__main__":
    main()
