"""The train job against two bare torch loops, side by side in this process, on the
same images, model, batch and threads:

- the fp32 NCHW loop a user would write (``ratio_vs_fp32_plain``: what captrain's
  speedups and data path give over it), and
- a bare loop with the train job's own speedups (``ratio_vs_same_speedups``: what
  streaming shards from SQL, decoding, metrics and checkpoints cost).

    python bench/train.py [--images 4000] [--epochs 2] [--precision auto] [--compile] [--json]

    python bench/train.py --rss 25000,200000

Peak RSS of the train job as the dataset grows: for each size, a dataset of that many
images (shards of 1000) is generated, then a fresh process runs the worker's own
``workers.jobs.training.train_run`` on it for one epoch (every training image streamed from
SQL, decoded and trained on; val and test evaluated; checkpoint and model stored),
once with the decoded-shard caches at 0 and once at their defaults, and reports its
peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import isolated_home, machine, workers  # noqa: E402

# A --rss-child process works in its parent's home (SQLite only: it sends no messages).
HOME = Path(os.environ["CAPTRAIN_HOME"]) if "--rss-child" in sys.argv else isolated_home()


def make_dataset(n: int, name: str = "bench-train", shard_size: int = 250) -> str:
    from scheduler import watch
    from scheduler.plan import plan_generate
    from shared.dispatch import send_job
    from shared.spec import GenerateSpec, validate

    spec = validate(GenerateSpec, name=name, count=n, length=4, charset="digits",
                    shard_size=shard_size, seed=1)
    with workers("cpu", 2, HOME):
        job_id, _ = plan_generate(spec)
        send_job(job_id)
        assert watch.wait(job_id, Console(quiet=True), interval=0.1, quiet=True) == "done"
    return spec.name


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM its
    peak, RssAnon its private part now), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _AnonPeak:
    """The largest RssAnon seen, sampled every 0.1 s on a thread. RSS counts the
    shared libraries' pages too (importing this CUDA build of torch alone maps about
    700 MB); RssAnon is the memory the process itself allocated: tensors, caches."""

    def __init__(self) -> None:
        import threading

        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def rss_child(name: str, cache: str) -> None:
    """One epoch of the worker's train_run on dataset ``name``; prints a JSON line."""
    import torch  # noqa: F401  (imported before the baseline reading)

    import workers.loader
    import workers.loop  # noqa: F401
    from scheduler.plan import plan_train
    from shared.settings import get_settings
    from shared.spec import TrainSpec, validate
    from workers.jobs import training

    settings = get_settings()  # the parent sets CAPTRAIN_*_CACHE_MIB to 0 for "off"
    run_id, _ = plan_train(validate(TrainSpec, dataset=name, epochs=1, batch_size=64,
                                    device="cpu", seed=0))
    base, base_anon = _status_mb("VmRSS"), _status_mb("RssAnon")
    anon = _AnonPeak()
    t0 = time.perf_counter()
    test = training.train_run(run_id, "bench-rss")
    assert test is not None
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM"),
                      "base_anon_mb": base_anon, "peak_anon_mb": anon.stop(),
                      "seconds": time.perf_counter() - t0, "test_count": test["count"],
                      "test_seq_acc": test["seq_acc"],
                      "cache_mb": {"train": settings.train_cache_mib,
                                   "val": settings.val_cache_mib}}))


def rss(sizes: list[int]) -> None:
    import torch

    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads", flush=True)
    for n in sizes:
        t0 = time.perf_counter()
        name = make_dataset(n, f"rss-{n}", shard_size=1000)
        print(f"{n} images generated in {time.perf_counter() - t0:.0f} s", flush=True)
        for cache in ("off", "default"):
            # The same code with every cache at 0: each shard is fetched and decoded
            # each time it is read.
            env = {**os.environ, **({"CAPTRAIN_TRAIN_CACHE_MIB": "0",
                                     "CAPTRAIN_VAL_CACHE_MIB": "0"} if cache == "off" else {})}
            out = subprocess.run([sys.executable, __file__, "--rss-child", name, cache],
                                 capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(out.stdout + out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>7} images, caches {cache:>7} {r['cache_mb']}: peak RSS "
                  f"{r['peak_mb']:6.0f} MB (after imports {r['base_mb']:.0f}), private "
                  f"(RssAnon) {r['peak_anon_mb']:5.0f} MB (after imports "
                  f"{r['base_anon_mb']:.0f}); one epoch + val + test in {r['seconds']:.0f} s, "
                  f"test seq_acc {r['test_seq_acc']:.3f} on {r['test_count']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile in the job and its same-speedups loop; the "
                         "compile time counts in their samples/s")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--rss", help="dataset sizes, comma-separated: peak RSS per size")
    ap.add_argument("--rss-child", nargs=2, metavar=("DATASET", "CACHE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child)
    if args.rss:
        return rss([int(n) for n in args.rss.split(",")])
    compare(args)


def _bare_loop(cfg, fast, X, Y, epochs: int, batch_size: int) -> float:
    """samples/s of a bare training loop over in-memory uint8 tensors: the loop a user
    would write, with the model, optimizer, schedule and batch of the train job, and
    the speedups ``fast`` (workers.device.Speedups)."""
    import torch

    from workers.loop import forward_loss
    from workers.models import build_model

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(cfg)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    if fast.compiled:
        model = torch.compile(model)
    steps = epochs * -(-len(X) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps,
                                                pct_start=0.2)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for e in range(epochs):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(e))
        for b in range(0, len(perm), batch_size):
            idx = perm[b : b + batch_size]
            _, loss = forward_loss(model, X[idx], Y[idx], device, cfg, fast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
    return seen / (time.perf_counter() - t0)


def _train_job(name: str, epochs: int, batch_size: int, precision: str,
               compile: bool = False) -> dict:
    """The worker's own train job (workers.jobs.training.train_run) in this process:
    shards streamed from SQL, decoded, batched, trained, metrics and checkpoints
    stored. Returns its mean training samples/s over the epochs and its speedups."""
    from sqlalchemy import select

    from scheduler.plan import plan_train
    from shared.db import session_scope
    from shared.schema import Metric
    from shared.spec import TrainSpec, validate
    from workers.jobs import training

    spec = validate(TrainSpec, dataset=name, epochs=epochs, batch_size=batch_size,
                    device="cpu", precision=precision, compile=compile)
    run_id, _ = plan_train(spec)
    assert training.train_run(run_id, "bench-train") is not None
    with session_scope() as s:
        rows = s.execute(select(Metric.epoch, Metric.name, Metric.value).where(
            Metric.run_id == run_id, Metric.split == "train")).all()
    per_epoch = {e: v for e, n, v in rows if n == "samples_per_s"}
    flags = {n: bool(v) for e, n, v in rows if e == 1 and n in (
        "bf16", "channels_last", "compiled")}
    return {"samples_per_s": sum(per_epoch.values()) / len(per_epoch), "speedups": flags}


def compare(args: argparse.Namespace) -> None:
    """The train job against two bare loops on the same data, model, batch and
    threads, in this process: the fp32 NCHW loop a user would write, and a loop with
    the train job's own speedups (what the data path and bookkeeping cost)."""
    import torch
    from sqlalchemy import select

    from shared.artifacts import read_verified
    from shared.db import session_scope
    from shared.lookup import find_dataset
    from shared.schema import Shard
    from workers.codecs import decode_shard
    from workers.device import PLAIN, Speedups
    from workers.models import ModelConfig

    name = make_dataset(args.images)
    with session_scope() as s:
        ds = find_dataset(s, name)
        shas = list(s.execute(select(Shard.sha256).where(
            Shard.job_id == ds.layout_job_id, Shard.split == "train").order_by(Shard.index)
        ).scalars())
        cfg = ModelConfig(charset=ds.charset, length=ds.length, in_height=30, in_width=80,
                          image_height=ds.height, image_width=ds.width)
        parts = [decode_shard(read_verified(s, sha), cfg) for sha in shas]
    X = torch.cat([p[0] for p in parts])
    Y = torch.cat([p[1] for p in parts])
    fast = Speedups.for_device(torch.device("cpu"), compile=args.compile,
                               precision=args.precision)
    # Interleaved, so that a drift of the machine's speed hits every side alike.
    plain = [_bare_loop(cfg, PLAIN, X, Y, args.epochs, args.batch_size)]
    same = [_bare_loop(cfg, fast, X, Y, args.epochs, args.batch_size)]
    job = _train_job(name, args.epochs, args.batch_size, args.precision, args.compile)
    same.append(_bare_loop(cfg, fast, X, Y, args.epochs, args.batch_size))
    plain.append(_bare_loop(cfg, PLAIN, X, Y, args.epochs, args.batch_size))
    mean_plain, mean_same = sum(plain) / 2, sum(same) / 2
    out = {
        "machine": machine(), "images": args.images, "train_images": len(X),
        "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "precision": args.precision,
        "compile": args.compile,
        "speedups": job["speedups"], "samples_per_s": round(job["samples_per_s"], 1),
        "fp32_plain_samples_per_s": [round(v, 1) for v in plain],
        "same_speedups_samples_per_s": [round(v, 1) for v in same],
        "ratio_vs_fp32_plain": round(job["samples_per_s"] / mean_plain, 3),
        "ratio_vs_same_speedups": round(job["samples_per_s"] / mean_same, 3),
    }
    print(f"machine: {out['machine']}; {out['threads']} torch threads")
    print(f"train split {len(X)} images, {args.epochs} epochs, batch {args.batch_size}, "
          f"speedups {job['speedups']}")
    print(f"train job (SQL shards, decoding, metrics, checkpoints): "
          f"{job['samples_per_s']:8.1f} samples/s")
    print(f"bare loop, fp32 NCHW (before, after):   {plain[0]:8.1f} {plain[1]:8.1f}")
    print(f"bare loop, same speedups (before, after): {same[0]:8.1f} {same[1]:8.1f}")
    print(f"ratio vs fp32 plain loop: {out['ratio_vs_fp32_plain']:.3f}; "
          f"vs the same speedups: {out['ratio_vs_same_speedups']:.3f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
