"""MNIST to its target: import the four IDX files, train, report test accuracy.

    python bench/mnist.py DIR [--model cnn] [--epochs 8]

DIR holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] from LeCun's MNIST
page (no download here: the build machines have no internet). The target is a test
accuracy of at least 0.992 on the 10,000 test digits. Without DIR, ``--handwriting``
runs the same path on the scikit-learn handwritten digits the tests use.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Replace this script's folder on the path: bench/queue.py must not shadow stdlib queue.
sys.path[0] = str(Path(__file__).resolve().parent.parent)
from rich.console import Console  # noqa: E402

from bench.harness import isolated_home, machine, workers  # noqa: E402

HOME = isolated_home()
TARGET = 0.992


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", nargs="?", type=Path)
    ap.add_argument("--handwriting", action="store_true",
                    help="build IDX files from scikit-learn's digits instead")
    ap.add_argument("--model", default="cnn", choices=["cnn", "lenet"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    if args.folder is None and not args.handwriting:
        ap.error("give the folder of the four MNIST files, or --handwriting")

    from scheduler import status, watch
    from scheduler.mnist import plan_mnist, scan_mnist
    from scheduler.plan import plan_train
    from shared.dispatch import send_job
    from shared.spec import TrainSpec, validate

    folder = args.folder
    if folder is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from handwriting import write_mnist

        folder = Path(tempfile.mkdtemp(prefix="handwriting-"))
        write_mnist(folder)
    console = Console()
    t0 = time.monotonic()
    files = scan_mnist(folder)
    plan_mnist(files, folder, "mnist", 1000, 1 / 12)  # 5,000 val of 60,000
    t_import = time.monotonic() - t0
    spec = validate(TrainSpec, dataset="mnist", model=args.model, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr)
    with workers("gpu", 1, HOME):
        run_id, job = plan_train(spec)
        send_job(job)
        final = watch.wait(job, Console(quiet=True), interval=1.0, quiet=True)
    detail = status.run_detail(run_id)
    if final != "done":
        raise SystemExit(f"training {final}: {detail['error']}")
    test = detail["test"]
    console.print(f"machine: {machine()}")
    console.print(f"imported {files.count} digits in {t_import:.1f} s; {args.model}, "
                  f"{args.epochs} epochs in {time.monotonic() - t0 - t_import:.0f} s")
    verdict = "meets" if test["seq_acc"] >= TARGET else "misses"
    console.print(f"test accuracy {test['seq_acc']:.4f} on {test['count']} digits "
                  f"({verdict} the {TARGET} target)")


if __name__ == "__main__":
    main()
