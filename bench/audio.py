"""Audio captchas end to end: generate, train the crnn, read fresh plain-package WAVs.

Generates ``--clips`` audio captchas of ``--min-length`` to ``--length`` digits with
the project's generate job on two worker processes, trains ``--model crnn`` through
the train job, then reads ``--fresh`` clips of ``--length`` digits written by the plain
``captcha`` package's ``AudioCaptcha`` (not the project's seeded generator). Prints
whole-clip and per-digit accuracy beside the run's own test figure.

    python bench/audio.py [--clips 8000] [--min-length 1] [--epochs 10] [--fresh 200]

Training on texts of one to four digits is the recipe (README, "Audio captchas"):
the short clips let CTC leave its all-blank start within two epochs, where on
4-digit clips alone it often stays there.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import generate_then_train, isolated_home, machine  # noqa: E402

HOME = isolated_home()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=8_000)
    ap.add_argument("--length", type=int, default=4)
    ap.add_argument("--min-length", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--fresh", type=int, default=200, help="plain-package clips to read")
    args = ap.parse_args()

    from captcha.audio import AudioCaptcha

    from scheduler import status
    from shared.spec import GenerateSpec, TrainSpec, validate
    from workers.predict import Predictor

    console = Console()
    gspec = validate(GenerateSpec, name="talk", kind="audio", count=args.clips,
                     length=args.length, min_length=args.min_length, charset="digits",
                     shard_size=min(250, args.clips), seed=7)
    tspec = validate(TrainSpec, dataset="talk", model="crnn", epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr)
    run_id, t_gen, t_train = generate_then_train(HOME, gspec, tspec)
    test = status.run_detail(run_id)["test"]

    predictor = Predictor.load(str(run_id))
    gen = AudioCaptcha()
    rng = random.Random(2026)
    texts = ["".join(rng.choice("0123456789") for _ in range(args.length))
             for _ in range(args.fresh)]
    whole = digits = 0
    misses: list[str] = []
    for k in range(0, len(texts), 50):
        batch = texts[k : k + 50]
        read = predictor.read_clips([bytes(gen.generate(t)) for t in batch])
        for (text, _), truth in zip(read, batch, strict=True):
            whole += text == truth
            digits += sum(a == b for a, b in zip(text, truth, strict=False))
            if text != truth and len(misses) < 8:
                misses.append(f"{truth} read {text or '(nothing)'}")

    console.print(f"machine: {machine()}")
    console.print(f"{args.clips} audio captchas of {args.min_length}-{args.length} digits: "
                  f"generated in "
                  f"{t_gen:.0f} s on 2 worker processes; crnn {args.epochs} epochs in "
                  f"{t_train:.0f} s")
    console.print(f"run {run_id} test split ({test['count']} clips): seq_acc "
                  f"{test['seq_acc']:.4f}, char_acc {test['char_acc']:.4f}")
    console.print(f"plain-package clips of {args.length} digits: {whole}/{args.fresh} = "
                  f"{whole / args.fresh:.4f} "
                  f"whole; digits in place {digits}/{args.fresh * args.length} = "
                  f"{digits / (args.fresh * args.length):.4f}")
    if misses:
        console.print("misses: " + "; ".join(misses))


if __name__ == "__main__":
    main()
