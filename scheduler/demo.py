"""``captrain demo``: the whole path on this machine, in one command.

Starts the embedded Redis (unless a broker is configured), two local workers (cpu
and gpu queues), generates 4-digit captchas, trains, evaluates, and reads captchas
freshly drawn by the plain ``captcha`` package. The workers are stopped on exit and
on Ctrl-C, and so is the embedded Redis if the demo started it (one that was already
running is left as it was found).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scheduler import status, watch
from scheduler.plan import plan_generate, plan_train
from scheduler.procs import start_worker, stop_worker
from shared.dispatch import send_job
from shared.errors import CaptrainError, StateError
from shared.settings import get_settings
from shared.spec import GenerateSpec, TrainSpec, validate

QUICK = {"count": 1_500, "shard_size": 250, "epochs": 2}
SHARD_SIZE = 1000
BUDGET_S = 360  # the README's promise: the whole demo in 6 minutes on 2 CPU cores


def run_demo(console: Console, quick: bool = False, count: int | None = None,
             epochs: int | None = None, budget: float = BUDGET_S) -> dict[str, object]:
    """Run the demo; return its summary. Without ``count`` and ``epochs`` its size is
    planned from a short speed check to fit ``budget`` seconds. Raises CaptrainError
    if a step fails."""
    t0 = time.monotonic()
    size = dict(QUICK) if quick else _planned(console, budget, count, epochs)
    size["count"] = count or size["count"]
    size["epochs"] = epochs or size["epochs"]
    with _local_services(console):
        summary = _steps(console, size["count"], size["shard_size"], size["epochs"])
    summary["seconds"] = round(time.monotonic() - t0, 1)
    out = Table("summary", "value")
    for k, v in summary.items():
        out.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(out)
    took = float(summary["seconds"])  # type: ignore[arg-type]
    over = "" if quick or took <= budget else f", over its {budget / 60:.0f} min budget"
    console.print(f"demo took {took / 60:.1f} min{over}")
    console.print(f"whole-sequence test accuracy: [bold]{summary['test_seq_acc']:.4f}[/bold]"
                  f" (the captcha notes reached 0.84)")
    return summary


def _planned(console: Console, budget: float, count: int | None, epochs: int | None
             ) -> dict[str, int]:
    """The demo's size: as given, or planned to fit ``budget`` from a speed check."""
    from scheduler import demo_plan

    if count is not None and epochs is not None:
        return {"count": count, "shard_size": SHARD_SIZE, "epochs": epochs}
    images, samples = demo_plan.measure()
    plan = demo_plan.plan(budget, images, samples)
    console.print(plan.describe())
    return {"count": plan.count, "shard_size": SHARD_SIZE, "epochs": plan.epochs}


@contextmanager
def _local_services(console: Console) -> Iterator[None]:
    """The embedded Redis (unless a broker is configured) and two local workers, for
    the length of the block.

    The workers stop on exit and on Ctrl-C, and so does the Redis if it was started
    here; one already running is left as it was found.
    """
    from shared import embedded

    settings = get_settings()
    started = settings.embedded_broker and embedded.start(settings)
    if settings.embedded_broker:
        console.print(f"embedded Redis at {settings.redis_socket}")
    console.print(f"database {settings.redacted()['effective_database_url']}")
    logs = settings.home / "logs"
    tag = f"{os.getpid()}"
    cpus = os.cpu_count() or 2
    procs = []
    try:
        procs.append(start_worker("cpu", cpus, f"demo-cpu-{tag}@%h", logs / "demo-cpu.log",
                                  "WARNING"))
        procs.append(start_worker("gpu", 1, f"demo-gpu-{tag}@%h", logs / "demo-gpu.log",
                                  "WARNING"))
        console.print(f"started workers (cpu x{cpus}, gpu x1); logs in {logs}")
        yield
    finally:
        for p in procs:
            stop_worker(p)
        # After the workers, which would otherwise keep reconnecting to it.
        if started:
            embedded.stop(settings)
            console.print("embedded Redis stopped (the demo started it)")


def _steps(console: Console, count: int, shard_size: int, epochs: int) -> dict[str, object]:
    """Generate, train and read fresh captchas; return what the summary shows."""
    name = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    gspec = validate(GenerateSpec, name=name, count=count, length=4, charset="digits",
                     shard_size=min(shard_size, count), seed=int(time.time()) % 100_000)
    job_id, _ = plan_generate(gspec)
    send_job(job_id)
    console.print(f"[bold]1/3[/bold] generating {gspec.count} captchas as {name}")
    if watch.wait(job_id, console) != "done":
        raise StateError(f"generation failed: {status.job_detail(job_id)['error']}")

    tspec = validate(TrainSpec, dataset=name, epochs=epochs)
    run_id, train_job = plan_train(tspec)
    send_job(train_job)
    console.print(f"[bold]2/3[/bold] training run {run_id} for {tspec.epochs} epochs")
    if watch.wait(train_job, console) != "done":
        raise StateError(f"training failed: {status.job_detail(train_job)['error']}")
    test = status.run_detail(run_id)["test"] or {}

    console.print("[bold]3/3[/bold] reading fresh captchas from the plain captcha package")
    table, hits = _predict_fresh(run_id)
    console.print(table)
    return {
        "dataset": name, "run": run_id, "images": gspec.count, "epochs": tspec.epochs,
        "test_images": test.get("count"), "test_char_acc": test.get("char_acc"),
        "test_seq_acc": test.get("seq_acc"), "fresh_correct": hits,
    }


def _predict_fresh(run_id: int, n: int = 8) -> tuple[Table, str]:
    import secrets

    from captcha.image import ImageCaptcha

    from workers.predict import Predictor, predict_files

    predictor = Predictor.load(str(run_id))
    gen = ImageCaptcha(160, 60)
    table = Table("file", "true", "read", "confidence", "ok")
    correct = 0
    with tempfile.TemporaryDirectory() as tmp:
        truths = {}
        paths = []
        for i in range(n):
            text = "".join(secrets.choice("0123456789") for _ in range(4))
            path = Path(tmp) / f"fresh-{i}.png"
            gen.write(text, str(path))
            truths[str(path)] = text
            paths.append(path)
        for r in predict_files(predictor, paths):
            if "error" in r:
                raise CaptrainError(r["error"])
            ok = r["text"] == truths[r["file"]]
            correct += ok
            table.add_row(Path(r["file"]).name, truths[r["file"]], r["text"],
                          f"{r['confidence']:.3f}", "yes" if ok else "[red]no[/red]")
    return table, f"{correct}/{n}"
