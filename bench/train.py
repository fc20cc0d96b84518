"""Training data path: samples/s of the train job's path (shards from the SQL store,
PNG decoding, transforms, batching) against a bare torch loop on in-memory tensors,
with the same model, optimizer and device, side by side in this process.

    python bench/train.py [--images 4000] [--epochs 2] [--batch-size 64]

Also prints this process's peak RSS. With ``--cache-mb 0`` every epoch streams and
decodes every shard again (the path a dataset larger than the cache takes).

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
import resource
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
    from scheduler.submit import send_job
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
    ap.add_argument("--cache-mb", type=int, default=512)
    ap.add_argument("--rss", help="dataset sizes, comma-separated: peak RSS per size")
    ap.add_argument("--rss-child", nargs=2, metavar=("DATASET", "CACHE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child)
    if args.rss:
        return rss([int(n) for n in args.rss.split(",")])

    import torch
    from sqlalchemy import select

    from shared.artifacts import read_verified
    from shared.db import session_scope
    from shared.lookup import find_dataset
    from shared.schema import Shard
    from workers.codecs import decode_shard, normalize
    from workers.loader import ShardLoader
    from workers.loop import _loss
    from workers.models import ModelConfig, build_model

    name = make_dataset(args.images)
    with session_scope() as s:
        ds = find_dataset(s, name)
        shas = list(s.execute(select(Shard.sha256).where(
            Shard.job_id == ds.layout_job_id, Shard.split == "train").order_by(Shard.index)
        ).scalars())
        cfg = ModelConfig(charset=ds.charset, length=ds.length, in_height=30, in_width=80,
                          image_height=ds.height, image_width=ds.width)

    def fetch(sha: str) -> bytes:
        with session_scope() as s:
            return read_verified(s, sha)

    def step(model, opt, x, y) -> None:
        loss = _loss(model(normalize(x, cfg)), y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(batches_of_epoch) -> float:
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        seen = 0
        t0 = time.perf_counter()
        for e in range(args.epochs):
            for x, y in batches_of_epoch(e):
                step(model, opt, x, y)
                seen += len(y)
        return seen / (time.perf_counter() - t0)

    # Baseline: everything decoded into memory beforehand (not timed), then a bare loop.
    parts = [decode_shard(fetch(sha), cfg) for sha in shas]
    X = torch.cat([p[0] for p in parts])
    Y = torch.cat([p[1] for p in parts])

    def in_memory(e: int):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(e))
        for b in range(0, len(perm), args.batch_size):
            idx = perm[b : b + args.batch_size]
            yield X[idx], Y[idx]

    streamed = ShardLoader(shas, fetch, cfg, args.batch_size, cache_bytes=0)
    cached = ShardLoader(shas, fetch, cfg, args.batch_size,
                         cache_bytes=args.cache_mb * 1024 * 1024)
    base = run(in_memory)
    stream_rate = run(streamed.epoch)
    cache_rate = run(cached.epoch)
    base2 = run(in_memory)  # again, to show the noise between identical runs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {machine()}")
    print(f"train split: {len(X)} images in {len(shas)} shards, {args.epochs} epochs, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    print(f"bare loop on in-memory tensors:       {base:7.1f} samples/s "
          f"(repeat: {base2:.1f})")
    print(f"data path, streamed every epoch:      {stream_rate:7.1f} samples/s")
    print(f"data path, decoded-shard cache:       {cache_rate:7.1f} samples/s")
    mean_base = (base + base2) / 2
    print(f"data-path ratio, streamed: {stream_rate / mean_base:.3f}; "
          f"cached: {cache_rate / mean_base:.3f}")
    print(f"peak RSS of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
