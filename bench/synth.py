"""Synthesis throughput: the generate job through Redis and the SQL store, against the
plain ``captcha`` loop, measured side by side in this process.

    python bench/synth.py [--images 4000] [--shard-size 250]

Prints images/s of: the plain ``ImageCaptcha.generate_image`` loop (1 core), the
plain loop with PNG encoding (what a stored dataset needs), the job with 1 worker
process, and the job with 2; then the ratios.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import isolated_home, machine, workers  # noqa: E402

HOME = isolated_home()


def plain_loop(n: int, encode: bool) -> float:
    from captcha.image import ImageCaptcha

    gen = ImageCaptcha(160, 60)
    rng = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(n):
        im = gen.generate_image("".join(rng.choice("0123456789") for _ in range(4)))
        if encode:
            im.save(io.BytesIO(), format="PNG")
    return n / (time.perf_counter() - t0)


def job_rate(n: int, shard_size: int, processes: int, tag: str) -> float:
    from scheduler import watch
    from scheduler.plan import plan_generate
    from scheduler.submit import enqueue_shards
    from shared.spec import GenerateSpec, validate

    spec = validate(GenerateSpec, name=f"bench-{tag}", count=n, length=4, charset="digits",
                    shard_size=shard_size, seed=processes)
    with workers("cpu", processes, HOME):
        t0 = time.perf_counter()
        job_id, idx = plan_generate(spec)
        enqueue_shards("generate", job_id, idx)
        status = watch.wait(job_id, Console(quiet=True), interval=0.05, quiet=True)
        elapsed = time.perf_counter() - t0
    assert status == "done", status
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()
    n = args.images
    base = plain_loop(n // 4, encode=False)
    base_png = plain_loop(n // 4, encode=True)
    one = job_rate(n, args.shard_size, 1, "one")
    two = job_rate(n, args.shard_size, 2, "two")
    print(f"machine: {machine()}")
    print(f"plain generate_image loop:        {base:8.1f} images/s (1 core)")
    print(f"plain loop + PNG encode:          {base_png:8.1f} images/s (1 core)")
    print(f"generate job, 1 worker process:   {one:8.1f} images/s")
    print(f"generate job, 2 worker processes: {two:8.1f} images/s")
    print(f"synthesis ratio (job 1 proc / plain generate_image): {one / base:.3f}")
    print(f"synthesis ratio (job 1 proc / plain + PNG):          {one / base_png:.3f}")
    print(f"2 processes vs 1:                                    {two / one:.3f}")


if __name__ == "__main__":
    main()
