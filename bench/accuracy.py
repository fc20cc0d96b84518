"""Accuracy of a preset on captchas drawn by the plain ``captcha`` package.

    python bench/accuracy.py --preset digits4 [--count N] [--epochs E] [--held-out 10000]
                             [--home DIR] [--json]

Generates the preset's dataset with the project's generate job, trains with the
preset through a real gpu-queue worker, then reads a held-out set made directly by
``ImageCaptcha(width, height).generate_image`` (not the project's seeded generator
path) with the stored model, and prints whole-sequence and per-character accuracy
and the wall time of each step. ``--count``/``--epochs`` shrink a run to estimate
its time before a full one.

``--home DIR`` keeps the data and the model in that CAPTRAIN_HOME (a throw-away one
otherwise); a second run there trains again on the dataset the first one generated
(``acc-PRESET``, when its spec is the same). ``--json`` makes the last line one JSON
object: ``held_out_seq_acc``, ``held_out_char_acc``, ``wall_s``, ``run``, and the
accuracy-against-time ``curve`` (one point per epoch: seconds since the start,
validation whole-sequence and per-character accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="digits4")
    ap.add_argument("--count", type=int, help="images to generate (default: the preset's)")
    ap.add_argument("--epochs", type=int, help="epochs (default: the preset's)")
    ap.add_argument("--held-out", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--home", type=Path,
                    help="keep the data and the model in this CAPTRAIN_HOME")
    ap.add_argument("--json", action="store_true",
                    help="end with one JSON line of the figures")
    return ap.parse_args(argv)


def kept_dataset(name: str, spec: dict[str, Any]) -> bool:
    """Whether the home holds the ready dataset ``name`` generated from ``spec``.
    Raises SystemExit for one of that name made otherwise (it would be mistaken)."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.schema import READY, Dataset, Job

    with session_scope() as s:
        ds = s.execute(select(Dataset).where(Dataset.name == name)).scalar_one_or_none()
        if ds is None:
            return False
        job = s.get(Job, ds.layout_job_id) if ds.layout_job_id is not None else None
        why = (f"is {ds.status}, not ready" if ds.status != READY or job is None
               else "was generated from another spec" if job.spec != spec else None)
        if why:
            raise SystemExit(f"this home's dataset {name!r} {why}; use another --home "
                             "or the same --count and --seed")
        return True


def main() -> None:
    args = parse_args()
    home = isolated_home(args.home)

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
    print(f"home: {home}", flush=True)
    print(f"preset {preset.name}: {gen_values}", flush=True)
    print(f"train spec: {tspec.model_dump()}", flush=True)

    t0 = time.monotonic()
    if kept_dataset(gspec.name, gspec.model_dump()):
        print(f"dataset {gspec.name} kept in {home}: not generated again", flush=True)
    else:
        with workers("cpu", os.cpu_count() or 2, home):
            job_id, _ = plan_generate(gspec)
            send_job(job_id)
            assert watch.wait(job_id, Console(quiet=True), interval=0.5, quiet=True) == "done"
    gen_s = time.monotonic() - t0
    print(f"dataset of {gspec.count} images ready in {gen_s:.0f} s", flush=True)

    curve: list[dict[str, Any]] = []
    t1 = time.monotonic()
    with workers("gpu", 1, home):
        run_id, train_job = plan_train(tspec)
        send_job(train_job)

        def show(row: dict) -> None:
            now = time.monotonic()
            curve.append({"epoch": row["epoch"], "s": round(now - t0, 1),
                          "val_seq_acc": row["val_seq_acc"],
                          "val_char_acc": row["val_char_acc"]})
            print(f"  epoch {row['epoch']:>3}  {now - t1:6.0f} s  "
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
    wall = time.monotonic() - t0
    print(f"wall time: {wall:.0f} s (dataset {gen_s:.0f} s, train {train_s:.0f} s)")
    if args.json:
        print(json.dumps({
            "preset": preset.name, "run": run_id, "home": str(home),
            "held_out_seq_acc": held["seq_acc"], "held_out_char_acc": held["char_acc"],
            "held_out_count": held["count"], "target": preset.target,
            "test_seq_acc": test["seq_acc"], "wall_s": round(wall, 1),
            "generate_s": round(gen_s, 1), "train_s": round(train_s, 1),
            "epochs": tspec.epochs, "count": gspec.count, "curve": curve,
            "machine": machine(),
        }))


if __name__ == "__main__":
    main()
