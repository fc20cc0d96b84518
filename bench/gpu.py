"""The GPU benchmark behind bench/gpu.sh: synthesis, then training with the GPU path,
timed from the first generated image to val seq_acc 0.99 on 4 digits.

    python bench/gpu.py --device cuda [--images 100000] [--epochs 10] [--compile]

Prints synthesis images/s, training samples/s per epoch (from the run's own train
metrics: samples trained per second of each epoch's pass, data loading included),
what the run turned on, and the wall time, synthesis included, at which the val
split's whole-sequence accuracy first reached the target. ``--device cpu`` runs the
same steps on a CPU (a smoke test of the script, not a benchmark).
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

from bench.harness import follow_run, isolated_home, machine, workers  # noqa: E402

HOME = isolated_home()
FLAGS = ("bf16", "channels_last", "cudnn_benchmark", "compiled", "pin_memory")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--loader-workers", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--target", type=float, default=0.99)
    args = ap.parse_args()

    from scheduler import watch
    from scheduler.plan import plan_generate, plan_train
    from shared.dispatch import send_job
    from shared.spec import GenerateSpec, TrainSpec, validate

    gspec = validate(GenerateSpec, name="gpu-bench", count=args.images, length=4,
                     charset="digits", shard_size=1000, seed=1)
    tspec = validate(TrainSpec, dataset=gspec.name, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, device=args.device,
                     loader_workers=args.loader_workers, compile=args.compile, seed=1)
    print(f"machine: {machine()}", flush=True)
    print(f"{gspec.count} 4-digit captchas 160x60, model at 80x30, {tspec.epochs} epochs, "
          f"batch {tspec.batch_size}, lr {tspec.lr}", flush=True)

    t0 = time.monotonic()
    cpus = os.cpu_count() or 2
    with workers("cpu", cpus, HOME):
        t_gen = time.monotonic()  # the worker is up: synthesis starts now
        job_id, _ = plan_generate(gspec)
        send_job(job_id)
        assert watch.wait(job_id, Console(quiet=True), interval=0.2, quiet=True) == "done"
        gen_s = time.monotonic() - t_gen
    print(f"synthesis: {gspec.count} images in {gen_s:.1f} s "
          f"({gspec.count / gen_s:.0f} images/s, {cpus} worker processes)", flush=True)

    reached: dict[str, float] = {}
    rates: list[float] = []
    with workers("gpu", 1, HOME):
        t_train = time.monotonic()
        run_id, train_job = plan_train(tspec)
        send_job(train_job)

        def on_epoch(row: dict) -> None:
            now = time.monotonic()
            rates.append(row.get("train_samples_per_s", 0.0))
            if row["val_seq_acc"] >= args.target and not reached:
                reached.update(epoch=row["epoch"], wall=now - t_gen, train=now - t_train)
            print(f"  epoch {row['epoch']:>2}: {rates[-1]:8.0f} samples/s, val seq_acc "
                  f"{row['val_seq_acc']:.4f} at {now - t_gen:6.1f} s from the first image",
                  flush=True)
            if len(rates) == 1:
                on = [f for f in FLAGS if row.get(f"train_{f}")]
                print(f"  on: {', '.join(on) or 'nothing'}; loader workers "
                      f"{row.get('train_loader_workers', 0):.0f}", flush=True)

        detail = follow_run(train_job, run_id, on_epoch, interval=0.25)
    if detail["status"] != "done":
        raise SystemExit(f"training {detail['status']}: {detail['error']}")
    steady = rates[1:] or rates  # the first epoch pays for cuDNN autotuning and caches
    print(f"training: {max(steady):.0f} samples/s at best, "
          f"{sum(steady) / len(steady):.0f} mean over epochs 2-{len(rates)} "
          f"(device {detail['device']})")
    print(f"test split: seq_acc {detail['test']['seq_acc']:.4f} "
          f"({detail['test']['count']} images)")
    if reached:
        print(f"time to val seq_acc {args.target}: {reached['wall']:.1f} s from the first "
              f"image, synthesis included (epoch {reached['epoch']:.0f}; "
              f"{reached['train']:.1f} s of it training)")
    else:
        print(f"val seq_acc never reached {args.target} in {args.epochs} epochs")
    print(f"wall time of the script: {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
