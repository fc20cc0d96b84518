"""Training and its results: train, predict, runs, run.

Option defaults are TrainSpec's own (shared.spec); rules on the values (the time
limit below the visibility timeout, the model fitting the dataset) are planning's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from scheduler.cli.args import JsonOpt, WaitOpt, parse_id
from scheduler.cli.jobs import follow
from scheduler.cli.render import console, emit, err_console, show_run
from shared.errors import ConfigError, InputError, SpecError
from shared.spec import TrainSpec, default, validate

commands = typer.Typer()
RegisterOpt = Annotated[str | None, typer.Option(
    help="The model name the finished run adds a version to (default: the dataset's).")]
LoaderWorkersOpt = Annotated[int | None, typer.Option(
    help="Processes decoding shards (default: 0 on CPU, up to 8 on CUDA).")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the model (compiles for minutes first).")]
ChannelsOpt = Annotated[int | None, typer.Option(
    help="Width of the first convolution (default: the model's own).")]
PrecisionOpt = Annotated[str, typer.Option(
    help="auto (bf16 where the hardware computes it: CUDA, or a CPU with AMX or "
         "AVX512-BF16), fp32 or bf16.")]


@commands.command()
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    model: Annotated[str, typer.Option(
        help="multihead, crnn (CTC, any length), cnn or lenet (digits), "
             "logreg or mlp (Iris).")] = default(TrainSpec, "model"),
    epochs: Annotated[int, typer.Option(
        help="Passes over the train split.")] = default(TrainSpec, "epochs"),
    batch_size: Annotated[int, typer.Option(
        help="Samples per step.")] = default(TrainSpec, "batch_size"),
    lr: Annotated[float, typer.Option(
        help="Peak learning rate (one-cycle).")] = default(TrainSpec, "lr"),
    device: Annotated[str, typer.Option(
        help="auto, cpu, cuda or mps.")] = default(TrainSpec, "device"),
    seed: Annotated[int, typer.Option(
        help="Seed of init and data order.")] = default(TrainSpec, "seed"),
    scale: Annotated[float | None, typer.Option(
        help="Image scale the model sees (default: 0.5 for captchas, 1 for digits).")
    ] = default(TrainSpec, "scale"),
    time_limit: Annotated[int, typer.Option(
        help="Hard limit, seconds; below CAPTRAIN_VISIBILITY_TIMEOUT.")
    ] = default(TrainSpec, "time_limit"),
    augment: Annotated[str, typer.Option(
        help="Training-time distortions: none, light or strong.")
    ] = default(TrainSpec, "augment"),
    loader_workers: LoaderWorkersOpt = default(TrainSpec, "loader_workers"),
    compile: CompileOpt = default(TrainSpec, "compile"),
    channels: ChannelsOpt = default(TrainSpec, "channels"),
    precision: PrecisionOpt = default(TrainSpec, "precision"),
    preset: Annotated[str | None, typer.Option(
        help="digits4 or digits-upper4: the model, epochs, lr, batch size, augmentation "
             "and scale of an accuracy target; options given here still win.")] = None,
    register: RegisterOpt = default(TrainSpec, "register"),
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a recognizer on the gpu queue (captchas, audio, MNIST or Iris)."""
    from scheduler import presets
    from scheduler.plan import plan_train
    from shared.dispatch import send_job

    values: dict[str, Any] = {
        "model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "device": device, "seed": seed, "scale": scale, "time_limit": time_limit,
        "augment": augment, "loader_workers": loader_workers, "compile": compile,
        "channels": channels, "precision": precision}
    if preset is not None:
        given = {k for k in values
                 if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
        values = presets.apply(preset, values, given)
    spec = validate(TrainSpec, dataset=dataset, register=register, **values)
    run_id, job_id = plan_train(spec)
    send_job(job_id)
    if not as_json and not wait:
        console.print(f"run {run_id}")
    follow(job_id, wait, as_json)
    if wait and not as_json:
        run(str(run_id), as_json=False)


@commands.command()
def predict(
    files: Annotated[list[Path], typer.Argument(
        help="Images (captchas, digit photos) or WAV clips, as the model reads.")],
    model: Annotated[str, typer.Option(
        help="NAME (its newest version), NAME@VERSION, NAME@ALIAS, a run id or latest.")
    ] = "latest",
    precision: Annotated[str, typer.Option(
        help="auto (bf16 where this CPU computes it, as training), fp32 (the arithmetic "
             "of an exported ONNX model) or bf16.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Print the text read from each image or clip, with its confidence."""
    # Lazily: predict is the one command that needs torch (the worker extra).
    try:
        from workers.predict import Predictor, predict_files
    except ImportError as exc:
        raise ConfigError(
            f"predict needs the worker extra (pip install 'captrain[worker]'): {exc}"
        ) from exc
    if precision not in ("auto", "fp32", "bf16"):
        raise SpecError(f"--precision {precision!r}: use auto, fp32 or bf16")
    predictor = Predictor.load(model, precision)
    results = predict_files(predictor, files)
    if as_json:
        # Which version read the files: an alias or a bare name moves between versions.
        which = {"model": f"{predictor.name}@{predictor.version}", "run": predictor.run_id}
        emit([{**r, **which} for r in results], True)
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


@commands.command()
def runs(as_json: JsonOpt = False) -> None:
    """List training runs, newest first."""
    from scheduler.status import list_runs

    emit(list_runs(), as_json, ["id", "job", "dataset", "model", "status", "epochs",
                                "device", "test_seq_acc", "test_char_acc"], "runs",
         optional=["device", "test_char_acc", "job"])


@commands.command()
def run(run_id: str, as_json: JsonOpt = False) -> None:
    """One run with per-epoch metrics and test results."""
    from scheduler.status import run_detail

    d = run_detail(parse_id(run_id, "run"))
    if as_json:
        emit(d, True)
    else:
        show_run(d)
