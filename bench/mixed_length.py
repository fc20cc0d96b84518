"""CRNN + CTC on captchas of mixed length, read back per length.

Generates a dataset whose texts have ``--min-length``..``--length`` characters with
the project's generate job, trains ``--model crnn`` through the train job, then reads
captchas drawn by the plain ``captcha`` package (``ImageCaptcha(160, 60)``, not the
project's generator path) of every length, and prints whole-sequence accuracy per
length beside the run's own test figure.

    python bench/mixed_length.py [--images 20000] [--epochs 10] [--fresh 300]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import generate_then_train, isolated_home, machine  # noqa: E402

HOME = isolated_home()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--min-length", type=int, default=4)
    ap.add_argument("--length", type=int, default=6)
    ap.add_argument("--charset", default="digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fresh", type=int, default=300, help="plain-library captchas per length")
    args = ap.parse_args()

    from captcha.image import ImageCaptcha

    from scheduler import status
    from shared.spec import CHARSETS, GenerateSpec, TrainSpec, validate
    from workers.predict import Predictor

    console = Console()
    gspec = validate(GenerateSpec, name="mixed", count=args.images, length=args.length,
                     min_length=args.min_length, charset=args.charset, shard_size=500, seed=4)
    tspec = validate(TrainSpec, dataset="mixed", model="crnn", epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr)
    run_id, t_gen, t_train = generate_then_train(HOME, gspec, tspec)
    test = status.run_detail(run_id)["test"]

    predictor = Predictor.load(str(run_id))
    gen = ImageCaptcha(160, 60)
    rng = random.Random(12345)
    chars = CHARSETS.get(args.charset, args.charset)
    hits: dict[int, int] = defaultdict(int)
    for n in range(args.min_length, args.length + 1):
        texts = ["".join(rng.choice(chars) for _ in range(n)) for _ in range(args.fresh)]
        for k in range(0, len(texts), 100):
            batch = texts[k : k + 100]
            read = predictor.read([gen.generate_image(t).convert("RGB") for t in batch])
            hits[n] += sum(r == t for (r, _), t in zip(read, batch, strict=True))

    console.print(f"machine: {machine()}")
    console.print(f"{args.images} captchas of {args.min_length}-{args.length} {args.charset}: "
                  f"generated in {t_gen:.0f} s; crnn {args.epochs} epochs in {t_train:.0f} s")
    console.print(f"run {run_id} test split ({test['count']} images): seq_acc "
                  f"{test['seq_acc']:.4f}, char_acc {test['char_acc']:.4f}")
    for n in range(args.min_length, args.length + 1):
        console.print(f"plain-library captchas of length {n}: {hits[n]}/{args.fresh} = "
                      f"{hits[n] / args.fresh:.4f} whole-sequence")


if __name__ == "__main__":
    main()
