"""The ``captrain`` command line: thin commands over planning, submission and status.

A user's mistake prints one ``error:`` line and exits non-zero, with no traceback.
People get rich tables and progress bars; scripts get ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from typer.core import TyperGroup

from shared.errors import CaptrainError, ConfigError, InputError, NotFound, SpecError
from shared.spec import GenerateSpec, Split, SplitSpec, TrainSpec, validate

console = Console()
err_console = Console(stderr=True)



class _Group(TyperGroup):
    """Turns every CaptrainError, from any subcommand, into one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:  # typer vendors click; its Context is private
        try:
            return super().invoke(ctx)
        except CaptrainError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            # Jobs live in SQL and on the workers: leaving the CLI cancels nothing.
            err_console.print("interrupted; submitted jobs go on (captrain jobs)")
            raise typer.Exit(130) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False,
                  help="Train captcha recognizers over a Celery task queue.")
db_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the job to its end.")]


def _settings() -> Any:
    from shared.settings import get_settings

    return get_settings()


def _emit(data: Any, as_json: bool, columns: list[str] | None = None, title: str = "") -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    cols = columns or (list(rows[0].keys()) if rows else [])
    table = Table(title=title or None)
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else _fmt(r.get(c)) for c in cols))
    console.print(table)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _parse_id(text: str, kind: str) -> int:
    # Ids are taken as text so that a malformed one gets the same one-line error as
    # an unknown one, not a usage screen.
    if not (text.isascii() and text.isdecimal()) or int(text) >= 2**31:
        raise NotFound(f"{kind} id {text!r} is not a positive number")
    return int(text)


def _finish(job_id: int, wait: bool, as_json: bool) -> None:
    from scheduler import status, watch

    if wait:
        import time

        t0 = time.monotonic()
        final = watch.wait(job_id, err_console if as_json else console, quiet=as_json)
        took = time.monotonic() - t0
        detail = status.job_detail(job_id)
        if as_json:
            _emit({k: v for k, v in detail.items() if k != "shard_list"}, True)
        else:
            console.print(_summary(detail, final, took), highlight=False)
        if final != "done":
            raise typer.Exit(1)
    elif as_json:
        _emit({"job": job_id, "status": "pending"}, True)
    else:
        console.print(f"job {job_id} submitted; follow it with `captrain watch {job_id}`")


def _test_line(t: dict[str, Any]) -> str:
    """A run's test result in words: cross-validated accuracy for Iris, whole-sequence
    and per-character accuracy for everything read as text."""
    if "cv_acc" in t:
        return (f"cross-validated accuracy {t['cv_acc']:.4f} ± {t['cv_std']:.4f} "
                f"over {t['folds']} folds")
    return f"test seq_acc {t['seq_acc']:.4f}, char_acc {t['char_acc']:.4f}"


def _summary(detail: dict[str, Any], final: str, took: float) -> str:
    """The closing line of a followed job: what it made, how fast, or why it stopped."""
    line = f"job {detail['id']} {detail['kind']} {final} after {took:.1f}s"
    if detail["shard_list"]:
        items = sum(s["count"] for s in detail["shard_list"] if s["status"] == "done")
        workers = len({s["worker"] for s in detail["shard_list"] if s["worker"]})
        line += (f": {detail['shards_done']}/{detail['shards']} shards, {items} items "
                 f"({items / max(took, 1e-9):.0f}/s) by {workers} worker(s)")
    if "run" in detail and detail["run"]["test"]:
        line += f": {_test_line(detail['run']['test'])}"
    if detail.get("error"):
        line += f": {detail['error']}"
    return line


# --- services ---------------------------------------------------------------------

@app.command()
def up() -> None:
    """Start the embedded Redis (a no-op when CAPTRAIN_BROKER_URL is set)."""
    from shared import embedded

    s = _settings()
    if not s.embedded_broker:
        console.print("CAPTRAIN_BROKER_URL is set; nothing to start")
        return
    started = embedded.start(s)
    console.print(f"embedded Redis {'started' if started else 'already running'} "
                  f"at {s.redis_socket}")


@app.command()
def down() -> None:
    """Stop the embedded Redis."""
    from shared import embedded

    stopped = embedded.stop(_settings())
    console.print("embedded Redis stopped" if stopped else "embedded Redis was not running")


@app.command()
def info(as_json: JsonOpt = False) -> None:
    """Show the settings in use, passwords redacted."""
    from shared import embedded

    s = _settings()
    data = s.redacted()
    data["embedded_broker"] = s.embedded_broker
    data["embedded_broker_running"] = embedded.is_running(s) if s.embedded_broker else None
    if as_json:
        _emit(data, True)
        return
    table = Table("setting", "value")
    for k, v in data.items():
        table.add_row(k, str(v))
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the schema migrations."""
    from alembic.util import CommandError
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from shared import migrate

    engine = create_engine(_settings().effective_database_url)
    try:
        migrate.upgrade(engine, revision)
        console.print(f"database at {migrate.current_revision(engine)}")
    except (SQLAlchemyError, CommandError) as exc:
        raise ConfigError(f"cannot upgrade the database: {str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision of the database."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from shared import migrate

    engine = create_engine(_settings().effective_database_url)
    try:
        console.print(f"{migrate.current_revision(engine)} (head {migrate.head_revision()})")
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the database: {str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    queues: Annotated[str, typer.Option("-Q", "--queues", help="cpu, gpu or cpu,gpu")] = "cpu,gpu",
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency",
                                                    help="Processes (default: cores).")] = None,
    name: Annotated[str | None, typer.Option("-n", "--hostname")] = None,
    loglevel: Annotated[str, typer.Option("-l", "--loglevel")] = "INFO",
) -> None:
    """Run a celery worker for the captrain app (extra options go to celery)."""
    from scheduler.procs import worker_argv

    bad = [q for q in queues.split(",") if q not in ("cpu", "gpu")]
    if bad:
        raise ConfigError(f"unknown queue {bad[0]!r}; queues are cpu and gpu")
    _settings()
    argv = worker_argv(queues, concurrency, name, loglevel) + list(ctx.args)
    sys.stdout.flush()
    os.execv(argv[0], argv)


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="HTTP port.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option(
        help="user:password; better set CAPTRAIN_FLOWER_BASIC_AUTH, which no `ps` shows."
    )] = None,
) -> None:
    """Run Flower for the captrain app: workers, tasks and progress, live."""
    import ipaddress

    auth = basic_auth or _settings().flower_basic_auth
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not auth:
        raise ConfigError(f"Flower would be open to the network on {address}: set "
                          "CAPTRAIN_FLOWER_BASIC_AUTH=user:password (or bind 127.0.0.1)")
    if auth is not None and (":" not in auth or auth.startswith(":")):
        raise ConfigError("Flower basic auth must be user:password")
    env = dict(os.environ)
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth  # through the environment, not argv
    argv = [sys.executable, "-m", "celery", "-A", "shared.celery_app", "flower",
            f"--port={port}", f"--address={address}"]
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


# --- jobs -------------------------------------------------------------------------

@app.command()
def generate(
    name: Annotated[str, typer.Option(help="Dataset name.")],
    count: Annotated[int, typer.Option(help="Number of captchas.")],
    kind: Annotated[str, typer.Option(
        help="image or audio (8 kHz WAV, digits and A-Z voices).")] = "image",
    length: Annotated[int, typer.Option(help="Characters per captcha (the most).")] = 4,
    min_length: Annotated[int | None, typer.Option(
        help="Fewest characters: lengths vary from this to --length (train with crnn).")
    ] = None,
    charset: Annotated[str, typer.Option(
        help="digits, upper, lower, alnum, digits-upper, or the characters.")] = "digits",
    width: Annotated[int, typer.Option(help="Image width, px.")] = 160,
    height: Annotated[int, typer.Option(help="Image height, px.")] = 60,
    shard_size: Annotated[int, typer.Option(help="Captchas per shard (one task).")] = 1000,
    seed: Annotated[int, typer.Option(help="Dataset seed: same seed, same bytes.")] = 0,
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.1,0.1",
    image_format: Annotated[str, typer.Option(
        help="pgm: grey, as the models read them, and fastest to make; "
             "png: the package's colours.")] = "pgm",
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Synthesize an image or audio captcha dataset across the cpu workers."""
    from scheduler.plan import plan_generate
    from scheduler.submit import enqueue_shards

    spec = validate(GenerateSpec, name=name, count=count, kind=kind, length=length,
                    min_length=min_length, charset=charset,
                    width=width, height=height, shard_size=shard_size, seed=seed,
                    split=Split.parse(split), image_format=image_format)
    job_id, indices = plan_generate(spec)
    enqueue_shards("generate", job_id, indices)
    _finish(job_id, wait, as_json)


@app.command("import")
def import_(
    folder: Annotated[Path, typer.Argument(help="Folder of images named <label>.png/.jpg")],
    name: Annotated[str, typer.Option(help="Dataset name.")],
    shard_size: Annotated[int, typer.Option(help="Images per shard.")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Import a folder of labelled images (the file stem is the label)."""
    from scheduler.plan import plan_import, scan_import

    validate(SplitSpec, dataset=name, shard_size=shard_size)
    total = len(scan_import(folder).files)
    with Progress(console=err_console, disable=as_json) as bar:
        task = bar.add_task(f"importing {folder}", total=total)
        job_id = plan_import(folder, name, shard_size, lambda n: bar.advance(task, n))
    if as_json:
        _emit({"job": job_id, "dataset": name, "count": total}, True)
    else:
        console.print(f"imported {total} images as dataset {name} (job {job_id}); "
                      f"split it with `captrain shard --dataset {name}`")


@app.command("import-mnist")
def import_mnist(
    folder: Annotated[Path, typer.Argument(
        help="Folder with the four MNIST IDX files, gzipped or raw.")],
    name: Annotated[str, typer.Option(help="Dataset name.")] = "mnist",
    shard_size: Annotated[int, typer.Option(help="Digits per shard.")] = 1000,
    val_fraction: Annotated[float, typer.Option(
        help="Tail of the train file kept as the val split.")] = 0.1,
    as_json: JsonOpt = False,
) -> None:
    """Import MNIST (train-images-idx3-ubyte ... t10k-labels-idx1-ubyte) ready to train."""
    from scheduler.mnist import plan_mnist, scan_mnist

    validate(SplitSpec, dataset=name, shard_size=shard_size)
    files = scan_mnist(folder)
    with Progress(console=err_console, disable=as_json) as bar:
        task = bar.add_task(f"importing {folder}", total=files.count)
        job_id = plan_mnist(files, folder, name, shard_size, val_fraction,
                            lambda n: bar.advance(task, n))
    if as_json:
        _emit({"job": job_id, "dataset": name, "train": files.train_images.count,
               "test": files.test_images.count}, True)
    else:
        console.print(f"imported {files.train_images.count} train and "
                      f"{files.test_images.count} test digits as dataset {name} "
                      f"(job {job_id}); train it with `captrain train --dataset {name} "
                      "--model cnn`")


@app.command()
def shard(
    dataset: Annotated[str, typer.Option(help="Imported dataset to split.")],
    split: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.1,0.1",
    shard_size: Annotated[int, typer.Option(help="Items per output shard.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Split an imported dataset into seeded train/val/test shards on the workers."""
    from scheduler.plan import plan_split
    from scheduler.submit import enqueue_shards

    spec = validate(SplitSpec, dataset=dataset, split=Split.parse(split),
                    shard_size=shard_size, seed=seed)
    job_id, indices = plan_split(spec)
    enqueue_shards("split", job_id, indices)
    _finish(job_id, wait, as_json)


@app.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    model: Annotated[str, typer.Option(
        help="multihead, crnn (CTC, any length), cnn or lenet (digits), "
             "logreg or mlp (Iris).")] = "multihead",
    epochs: Annotated[int, typer.Option(help="Passes over the train split.")] = 6,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 3e-3,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of init and data order.")] = 0,
    scale: Annotated[float | None, typer.Option(
        help="Image scale the model sees (default: 0.5 for captchas, 1 for digits).")
    ] = None,
    time_limit: Annotated[int, typer.Option(
        help="Hard limit, seconds; below CAPTRAIN_VISIBILITY_TIMEOUT.")] = 12 * 3600 - 600,
    augment: Annotated[str, typer.Option(
        help="Training-time distortions: none, light or strong.")] = "none",
    loader_workers: Annotated[int | None, typer.Option(
        help="Processes decoding shards (default: 0 on CPU, up to 8 on CUDA).")] = None,
    compile: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the model (compiles for minutes first).")] = False,
    preset: Annotated[str | None, typer.Option(
        help="digits4 or digits-upper4: the model, epochs, lr, batch size, augmentation "
             "and scale of an accuracy target; options given here still win.")] = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a recognizer on the gpu queue (captchas, audio, MNIST or Iris)."""
    from scheduler import presets
    from scheduler.plan import plan_train
    from scheduler.submit import enqueue_train

    values: dict[str, Any] = {
        "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "device": device, "seed": seed, "scale": scale, "time_limit": time_limit,
        "augment": augment, "loader_workers": loader_workers, "compile": compile}
    if preset is not None:
        given = {k for k in values
                 if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
        values = presets.apply(preset, values, given)
    spec = validate(TrainSpec, dataset=dataset, **values)
    vt = _settings().visibility_timeout
    if spec.time_limit >= vt:
        # Redis redelivers an unacked message after the visibility timeout: a task
        # allowed to run longer would be delivered again while it runs.
        raise SpecError(f"time limit {spec.time_limit} s must stay below "
                        f"CAPTRAIN_VISIBILITY_TIMEOUT ({vt} s)")
    run_id, job_id = plan_train(spec)
    enqueue_train(run_id, job_id, spec.time_limit)
    if not as_json and not wait:
        console.print(f"run {run_id}")
    _finish(job_id, wait, as_json)
    if wait and not as_json:
        run(str(run_id), as_json=False)


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(
        help="Images (captchas, digit photos) or WAV clips, as the model reads.")],
    model: Annotated[str, typer.Option(help="Run id, dataset name or latest.")] = "latest",
    as_json: JsonOpt = False,
) -> None:
    """Print the text read from each image or clip, with its confidence."""
    try:
        from workers.predict import Predictor, predict_files
    except ImportError as exc:
        raise ConfigError(
            f"predict needs the worker extra (pip install 'captrain[worker]'): {exc}"
        ) from exc
    predictor = Predictor.load(model)
    results = predict_files(predictor, files)
    if as_json:
        _emit(results, True)
    else:
        for r in results:
            if "error" in r:
                err_console.print(f"[red]error:[/red] {r['error']}", highlight=False,
                                  soft_wrap=True)
            else:
                console.print(f"{r['file']}\t{r['text']}\t{r['confidence']:.3f}",
                              highlight=False)
    if any("error" in r for r in results):
        raise typer.Exit(InputError.exit_code)





@app.command()
def watch(job_id: str) -> None:
    """Follow a job with progress bars until it ends (Ctrl-C detaches)."""
    _finish(_parse_id(job_id, "job"), True, False)


@app.command()
def cancel(job_id: str, as_json: JsonOpt = False) -> None:
    """Cancel a job: queued tasks become no-ops, running ones stop at their next
    shard boundary or checkpoint."""
    from shared.records import cancel_job

    jid = _parse_id(job_id, "job")
    changed = cancel_job(jid)
    if as_json:
        _emit({"job": jid, "cancelled": changed}, True)
    else:
        console.print(f"job {jid} cancelled" if changed else f"job {jid} had already ended")


@app.command()
def retry(job_id: str, wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Re-run what a failed or cancelled job left undone (training resumes from its
    checkpoint)."""
    from scheduler.submit import enqueue_shards, enqueue_train
    from shared.records import reopen_job
    from shared.spec import TrainSpec

    jid = _parse_id(job_id, "job")
    kind, indices, run_id = reopen_job(jid)
    if run_id is not None:
        from scheduler.status import job_detail

        spec = TrainSpec(**job_detail(jid)["spec"])
        enqueue_train(run_id, jid, spec.time_limit)
    else:
        enqueue_shards(kind, jid, indices)
    _finish(jid, wait, as_json)


@app.command("reconcile")
def reconcile_cmd(
    as_json: JsonOpt = False,
    every: Annotated[float | None, typer.Option(
        help="Repeat every this many seconds (for a service); Ctrl-C stops.")] = None,
) -> None:
    """Re-send the messages of unfinished jobs from SQL (after a broker restart)."""
    import time

    from scheduler.submit import reconcile

    if every is not None and every < 10:
        raise SpecError("--every must be at least 10 seconds")
    while True:
        sent = reconcile()
        if as_json:
            _emit(sent, True)
        else:
            console.print(f"re-sent {sent['shards']} shard tasks, {sent['runs']} runs and "
                          f"{sent['analyses']} analyses; left {sent['held']} that live "
                          "workers hold")
        if every is None:
            return
        time.sleep(every)


# --- status -----------------------------------------------------------------------

@app.command()
def jobs(as_json: JsonOpt = False) -> None:
    """List jobs, newest first."""
    from scheduler.status import list_jobs

    _emit(list_jobs(), as_json, ["id", "kind", "name", "status", "shards_done", "shards",
                                 "created", "error"], "jobs")


@app.command()
def job(job_id: str, as_json: JsonOpt = False) -> None:
    """One job with per-shard progress."""
    from scheduler.status import job_detail

    d = job_detail(_parse_id(job_id, "job"))
    if as_json:
        _emit(d, True)
        return
    _emit({k: v for k, v in d.items() if k in ("id", "kind", "name", "status",
                                               "shards_done", "shards", "error")}, False)
    if d["shard_list"]:
        _emit(d["shard_list"], False, ["index", "split", "count", "status", "worker",
                                       "attempts", "error"], "shards")
    if "run" in d:
        _show_run(d["run"])


@app.command()
def runs(as_json: JsonOpt = False) -> None:
    """List training runs, newest first."""
    from scheduler.status import list_runs

    _emit(list_runs(), as_json, ["id", "job", "dataset", "model", "status", "epochs",
                                 "device", "test_seq_acc", "test_char_acc"], "runs")


def _show_run(d: dict[str, Any]) -> None:
    _emit({k: d[k] for k in ("id", "dataset", "model", "status", "device", "epochs_done",
                             "epochs", "resumed_from", "error")}, False)
    if d["per_epoch"]:
        _emit(d["per_epoch"], False, ["epoch", "train_loss", "train_seq_acc", "val_loss",
                                      "val_char_acc", "val_seq_acc"], "epochs")
    t = d["test"]
    if t and "cv_acc" in t:
        console.print(f"{_test_line(t)}; per fold {[round(a, 4) for a in t['fold_acc']]}")
    elif t:
        console.print(f"{_test_line(t)}, per position "
                      f"{[round(p, 4) for p in t['per_position']]} ({t['count']} items)")


@app.command()
def run(run_id: str, as_json: JsonOpt = False) -> None:
    """One run with per-epoch metrics and test results."""
    from scheduler.status import run_detail

    d = run_detail(_parse_id(run_id, "run"))
    if as_json:
        _emit(d, True)
    else:
        _show_run(d)


@app.command()
def datasets(as_json: JsonOpt = False) -> None:
    """List datasets."""
    from scheduler.status import list_datasets

    _emit(list_datasets(), as_json, None, "datasets")


@app.command()
def workers(
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for replies.")] = 2.0,
) -> None:
    """List live workers and what they run (Celery inspect)."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import RedisError

    from scheduler.submit import inspector

    try:
        with inspector(timeout) as insp:
            queues = insp.active_queues() or {}
            active = insp.active() or {}
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise ConfigError(f"broker unreachable: {exc}") from exc
    rows = [
        {"worker": w, "queues": ",".join(q["name"] for q in qs),
         "active": len(active.get(w, [])),
         "tasks": "; ".join(f"{t['name']}{t['args']}" for t in active.get(w, []))}
        for w, qs in sorted(queues.items())
    ]
    _emit(rows, as_json, ["worker", "queues", "active", "tasks"], "workers")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="A sub-minute smoke version.")] = False,
    count: Annotated[int | None, typer.Option(help="Captchas to generate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
) -> None:
    """Generate, train, evaluate and predict end to end on local workers."""
    from scheduler.demo import run_demo

    run_demo(console, quick=quick, count=count, epochs=epochs)


# --- analysis: explore and report -------------------------------------------------

OutOpt = Annotated[Path | None, typer.Option(
    "--out", help="Folder to write the files into (created if missing).")]


@app.command()
def explore(
    dataset: Annotated[str, typer.Argument(help="Dataset to explore: iris.")],
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Statistics and plots of a dataset (iris), computed on a cpu worker; waits for it.

    Per attribute, overall and per class: min, max, mean, sample sd and variance
    (ddof=1), and the 10/25/50/75/90th percentiles; also the sample covariance.
    --out DIR writes sepal-scatter.png, pairplot.png, stats.csv and covariance.csv.
    """
    from scheduler import analysis

    analysis.check_out_dir(out)
    job_id = analysis.plan_explore(dataset)
    analysis.enqueue("explore", job_id)
    analysis.wait(job_id, err_console, quiet=as_json)
    result = analysis.fetch(job_id)
    written = analysis.write_files(out, result.files) if out is not None else []
    if as_json:
        _emit({"job": job_id, **result.summary, "files": sorted(result.files),
               "written": [str(p) for p in written]}, True)
        return
    _show_explore(result.summary)
    where = f"; wrote {len(written)} files to {out}" if written else ""
    console.print(f"job {job_id}: {result.summary['n']} rows of {dataset}{where}",
                  highlight=False)


def _show_explore(summary: dict[str, Any]) -> None:
    # One table per attribute, statistics down and classes across: it fits 80 columns.
    labels = {"min": "min", "max": "max", "mean": "mean", "sample_sd": "sd (sample, ddof=1)",
              "sample_var": "var (sample, ddof=1)"}
    classes = ["all", *summary["classes"]]
    for attr in summary["attributes"]:
        by_class = {r["class"]: r for r in summary["stats"] if r["attribute"] == attr}
        stats = [c for c in by_class["all"] if c not in ("attribute", "class")]
        rows = [{"statistic": labels.get(st, f"{st[1:]}th percentile"),
                 **{c: by_class[c][st] for c in classes}} for st in stats]
        _emit(rows, False, ["statistic", *classes], f"{summary['dataset']}: {attr}")
    cov = summary["covariance"]
    names = [a.removesuffix(" (cm)") for a in cov["attributes"]]
    _emit([{"": a, **dict(zip(names, row, strict=True))}
           for a, row in zip(names, cov["matrix"], strict=True)], False, ["", *names],
          "sample covariance (ddof=1), cm²")
    console.print("percentiles interpolate linearly between order statistics (R type 7)",
                  highlight=False)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="Id of a finished training run.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for index.html and its PNGs (created if missing).")],
    limit: Annotated[int, typer.Option(
        help="Test items to read, at most (the first ones, in shard order).")] = 1000,
    as_json: JsonOpt = False,
) -> None:
    """Training curves, a grid of test predictions and per-position confusion
    matrices of a finished run, with an index.html; rendered on a cpu worker."""
    from scheduler import analysis

    rid = _parse_id(run_id, "run")
    analysis.check_out_dir(out)
    job_id = analysis.plan_report(rid, limit)
    analysis.enqueue("report", job_id)
    analysis.wait(job_id, err_console, quiet=as_json)
    result = analysis.fetch(job_id)
    written = analysis.write_files(out, result.files)
    s = result.summary
    if as_json:
        # The confusion matrices are in summary.json in the folder; a script reading
        # this line wants the headline numbers and where the files went.
        _emit({"job": job_id, **{k: v for k, v in s.items() if k != "confusion"},
               "out": str(out), "files": [p.name for p in written]}, True)
        return
    console.print(
        f"report of run {rid} ({s['dataset']}): {s['evaluated']} of {s['test_items']} test "
        f"items, seq_acc {s['seq_acc']:.4f}, char_acc {s['char_acc']:.4f}, "
        f"{s['length_mismatch']} length mismatches; open {out / 'index.html'}",
        highlight=False)



# --- end of analysis ---------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
