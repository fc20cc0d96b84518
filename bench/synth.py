"""Synthesis throughput: the generate job through Redis and the SQL store, against the
plain ``captcha`` loop, measured side by side in this process.

    python bench/synth.py [--images 12000] [--rounds 3] [--shard-size 250]
                          [--image-format pgm|png] [--json]

The synthesis ratio runs the job on 1 worker process while the plain
``ImageCaptcha.generate_image`` loop runs on the other core, over the same seconds;
the scaling ratio alternates the job on 1 and on 2 worker processes, and beside it
the plain loop in 1 and 2 processes shows what the machine's two cores give the
library alone. Each is measured in rounds and the medians printed. For reference it
also prints what PNG encoding costs the plain loop (storing the package's colours).
The job stores ``--image-format`` (grey PGM by default, as ``captrain generate``
does).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median
from typing import Any

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import isolated_home, machine, workers  # noqa: E402

HOME = isolated_home()


def _labels(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(4))


def _rendered(encode: bool) -> Iterator[None]:
    """The plain library loop: one captcha per step, PNG-encoded if ``encode``."""
    from captcha.image import ImageCaptcha

    gen = ImageCaptcha(160, 60)
    rng = random.Random(0)
    while True:
        im = gen.generate_image(_labels(rng))
        if encode:
            im.save(io.BytesIO(), format="PNG")
        yield


def plain_loop(n: int, encode: bool) -> float:
    """Images/s of ``n`` steps of the plain loop in this process."""
    steps = _rendered(encode)
    next(steps)  # past font loading
    t0 = time.perf_counter()
    for _ in range(n):
        next(steps)
    return n / (time.perf_counter() - t0)


def _count_forever(counter: Any) -> None:
    """The plain loop in a process of its own, counting images until it is killed."""
    for _ in _rendered(encode=False):
        with counter.get_lock():
            counter.value += 1


class PlainAlongside:
    """``processes`` plain loops in processes of their own while a block runs: ``rate``
    is their images/s together over exactly the block, so that both sides see the
    same moment of the machine."""

    def __init__(self, processes: int = 1) -> None:
        self.processes = processes

    def __enter__(self) -> PlainAlongside:
        ctx = mp.get_context("spawn")
        self._n = ctx.Value("q", 0)
        self._procs = [ctx.Process(target=_count_forever, args=(self._n,), daemon=True)
                       for _ in range(self.processes)]
        for proc in self._procs:
            proc.start()
        while self._n.value < 5 * self.processes:  # past imports and font loading
            time.sleep(0.05)
        self._start = (self._n.value, time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        done, t1 = self._n.value, time.perf_counter()
        for proc in self._procs:
            proc.kill()
            proc.join()
        self.rate = (done - self._start[0]) / (t1 - self._start[1])


def plain_rate(processes: int, seconds: float) -> float:
    """Images/s of ``processes`` plain loops together, over ``seconds``."""
    with PlainAlongside(processes) as plain:
        time.sleep(seconds)
    return plain.rate


def job_rate(n: int, shard_size: int, processes: int, tag: str, image_format: str) -> float:
    """Images/s of one generate job, from submission to the time the job's row says it
    finished (so the benchmark can poll slowly and take no CPU from the workers)."""
    from scheduler import watch
    from scheduler.plan import plan_generate
    from shared.db import session_scope
    from shared.dispatch import send_job
    from shared.schema import Job
    from shared.spec import GenerateSpec, validate

    spec = validate(GenerateSpec, name=f"bench-{tag}-{processes}", count=n, length=4,
                    charset="digits", shard_size=shard_size, seed=processes,
                    image_format=image_format)
    t0 = time.time()
    job_id, _ = plan_generate(spec)
    send_job(job_id)
    status = watch.wait(job_id, Console(quiet=True), interval=0.5, quiet=True)
    assert status == "done", status
    with session_scope() as s:
        done = s.get_one(Job, job_id).finished_at
    assert done is not None  # timezone-aware on every database (shared.schema.UTCDateTime)
    return n / (done.timestamp() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=12000,
                    help="captchas per job run (large enough for a steady state)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--image-format", choices=("pgm", "png"), default="pgm")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = ap.parse_args()
    n, fmt = args.images, args.image_format
    print(f"machine: {machine()}")
    print(f"job stores {fmt}; {n} captchas per job run, {args.rounds} rounds")
    png = plain_loop(n // 6, encode=True) / plain_loop(n // 6, encode=False)
    print(f"PNG encoding: the plain loop runs at {png:.3f} of its speed with it")

    # Synthesis ratio: 1 worker process on one core, the plain loop on the other, at
    # the same time, so that the machine's drift (large on these VMs) cancels out.
    alongside = []
    with workers("cpu", 1, HOME):
        for r in range(args.rounds):
            with PlainAlongside() as plain:
                job = job_rate(n, args.shard_size, 1, f"a{r}", fmt)
            alongside.append(job / plain.rate)
            print(f"  round {r + 1}: job {job:6.1f} images/s, plain loop alongside "
                  f"{plain.rate:6.1f} images/s: {job / plain.rate:.3f}")

    # 2 processes against 1, alternating, each pair measured a minute apart at most;
    # beside each pair, the plain loop in 2 processes against 1 over as many seconds:
    # what this machine's two cores give the library alone.
    scaling, ceiling = [], []
    for r in range(args.rounds):
        rates = {}
        for processes in (1, 2):
            with workers("cpu", processes, HOME):
                rates[processes] = job_rate(n, args.shard_size, processes, f"s{r}", fmt)
        seconds = n / rates[2]
        lib = {k: plain_rate(k, seconds) for k in (1, 2)}
        scaling.append(rates[2] / rates[1])
        ceiling.append(lib[2] / lib[1])
        print(f"  round {r + 1}: job 1 process {rates[1]:6.1f} images/s, 2 processes "
              f"{rates[2]:6.1f}: {scaling[-1]:.3f}; plain loop 1 process {lib[1]:6.1f}, "
              f"2 processes {lib[2]:6.1f}: {ceiling[-1]:.3f}")
    print(f"synthesis ratio (job 1 proc / plain generate_image): {median(alongside):.3f} "
          "(median)")
    print(f"2 processes vs 1, job:                               {median(scaling):.3f} "
          "(median)")
    print(f"2 processes vs 1, plain loop (the machine's ceiling): {median(ceiling):.3f} "
          "(median)")
    print(f"job's scaling / the plain loop's:                    "
          f"{median(scaling) / median(ceiling):.3f}")
    if args.json:
        from shared.settings import get_settings

        settings = get_settings()
        print(json.dumps({
            "ratio_vs_plain": round(median(alongside), 3),
            "scaling_job": round(median(scaling), 3),
            "scaling_plain": round(median(ceiling), 3),
            "scaling_ratio": round(median(scaling) / median(ceiling), 3),
            "rounds": {"ratio_vs_plain": alongside, "scaling_job": scaling,
                       "scaling_plain": ceiling},
            "images": n, "image_format": fmt,
            "broker": "embedded" if settings.embedded_broker else "redis",
            "database": settings.effective_database_url.split(":", 1)[0]}))


if __name__ == "__main__":
    main()
