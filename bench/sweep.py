"""A sweep against the default training config, on the same data and epochs.

    python bench/sweep.py [--images 6000] [--trials 16] [--parallel 2] [--epochs 3] [--json]

Generates one dataset of 4-digit captchas, then, on one cpu worker and PARALLEL
gpu-queue workers (one torch thread each, so that PARALLEL trials share the cores
fairly), runs:

- the default config (``captrain train`` with only ``--epochs``), as the baseline;
- a sweep of TRIALS trials over learning rate, batch size, width and model, with the
  median pruner, on the same dataset and epochs.

It prints both results on the test split and on captchas drawn by the plain
``captcha`` package, by how much the sweep's best trial won or lost, and the sweep's
wall time against the sum of its trials' own times (the parallel speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: each worker one thread

from bench.harness import held_out_accuracy, isolated_home, machine, workers  # noqa: E402

HOME = isolated_home()
SPACE = ["lr=loguniform(3e-4,1e-2)", "batch_size=choice(32,64,128)", "channels=int(16,48)",
         "model=choice(multihead,crnn)"]


def _wait(job_id: int) -> str:
    from rich.console import Console

    from scheduler import watch

    return watch.wait(job_id, Console(quiet=True), interval=2.0, quiet=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from scheduler.plan import plan_generate, plan_sweep, plan_train
    from scheduler.status import run_detail, sweep_detail
    from shared.dispatch import send_job
    from shared.spec import GenerateSpec, TrainSpec

    say = print if not args.json else (lambda *a, **k: print(*a, **k, file=sys.stderr))
    say(f"machine: {machine()}")
    with workers("cpu", 2, HOME):
        gen, _ = plan_generate(GenerateSpec(name="swb", count=args.images, length=4,
                                            charset="digits", shard_size=500, seed=21))
        send_job(gen)
        if _wait(gen) != "done":
            raise SystemExit(f"generate job {gen} did not finish")
    with workers("cpu", 1, HOME), workers("gpu", args.parallel, HOME):
        t0 = time.monotonic()
        run_id, job = plan_train(TrainSpec(dataset="swb", epochs=args.epochs))
        send_job(job)
        if _wait(job) != "done":
            raise SystemExit(f"the default run's job {job} did not finish")
        default_s = time.monotonic() - t0
        default = run_detail(run_id)
        say(f"default config: test seq_acc {default['test']['seq_acc']:.4f} "
            f"in {default_s:.0f} s")
        t0 = time.monotonic()
        sweep = plan_sweep(dataset="swb", trials=args.trials, parallel=args.parallel,
                           metric="val_seq_acc", space=SPACE, pruner="median",
                           sampler="tpe", seed=1, register=None,
                           base={"epochs": args.epochs})
        send_job(sweep)
        end = _wait(sweep)
        sweep_s = time.monotonic() - t0
    detail = sweep_detail(sweep)
    if end != "done" or detail["best"] is None:
        raise SystemExit(f"sweep {sweep} ended {end} with no best trial")
    best_run = detail["best"]["run"]
    best = run_detail(best_run)
    held = {name: held_out_accuracy(r, args.held_out, "0123456789", 4, 160, 60, seed=5)
            for name, r in (("default", run_id), ("best", best_run))}
    trial_s = [t["seconds"] for t in detail["trials"] if t["seconds"] is not None]
    counts = detail["counts"]
    out = {
        "trials": args.trials, "parallel": args.parallel, "epochs": args.epochs,
        "images": args.images, "complete": counts["complete"], "pruned": counts["pruned"],
        "failed": counts["failed"], "best_params": detail["best"]["params"],
        "best_val_seq_acc": detail["best"]["value"],
        "default_test_seq_acc": default["test"]["seq_acc"],
        "best_test_seq_acc": best["test"]["seq_acc"],
        "default_held_out_seq_acc": held["default"]["seq_acc"],
        "best_held_out_seq_acc": held["best"]["seq_acc"],
        "won_by_test": best["test"]["seq_acc"] - default["test"]["seq_acc"],
        "won_by_held_out": held["best"]["seq_acc"] - held["default"]["seq_acc"],
        "default_wall_s": round(default_s, 1), "sweep_wall_s": round(sweep_s, 1),
        "trials_sum_s": round(sum(trial_s), 1),
        "parallel_speedup": round(sum(trial_s) / sweep_s, 3),
    }
    for t in detail["trials"]:
        say(f"  trial {t['number']:2d} {t['state']:8s} {t['value']} {t['params']}")
    say(f"best trial #{detail['best']['number']} {detail['best']['params']}: test seq_acc "
        f"{out['best_test_seq_acc']:.4f} vs default {out['default_test_seq_acc']:.4f}; "
        f"held-out {out['best_held_out_seq_acc']:.4f} vs {out['default_held_out_seq_acc']:.4f}")
    say(f"sweep wall {sweep_s:.0f} s, trials' own time {sum(trial_s):.0f} s: parallel "
        f"speedup {out['parallel_speedup']:.2f} on {args.parallel} workers")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
