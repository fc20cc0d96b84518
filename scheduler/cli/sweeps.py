"""Hyperparameter sweeps: submit one, show its trials, list them.

A sweep is a job; its trials are train jobs on the gpu queue, asked for from Optuna
by small cpu tasks as earlier trials end (``workers.jobs.sweeps``), so nothing here
waits for it unless ``--wait`` says so.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from scheduler.cli.args import JsonOpt, WaitOpt, parse_id
from scheduler.cli.render import console, emit, err_console, show_sweep
from shared.errors import SpecError
from shared.spec import SweepSpec, default

commands = typer.Typer()
group = typer.Typer(invoke_without_command=True, help=(
    "Search training parameters with Optuna, trials running in parallel on the gpu "
    "queue: captrain sweep --dataset D --space 'lr=loguniform(1e-4,1e-2)' ...; "
    "captrain sweep show ID."))

FIXED = ("model", "epochs", "batch_size", "lr", "scale", "augment", "channels",
         "precision", "time_limit")


SpaceOpt = Annotated[list[str] | None, typer.Option(
    help="NAME=KIND(ARGS), repeated: uniform(a,b), loguniform(a,b), int(a,b), "
         "choice(v,...) over lr, batch_size, channels, model, augment, scale.")]
MetricOpt = Annotated[str, typer.Option(
    help="val_seq_acc, val_char_acc (maximized) or val_loss (minimized), read at each "
         "epoch's end.")]
RegisterOpt = Annotated[str | None, typer.Option(
    help="Model name the trials register as (default: DATASET-sweepID); its alias best "
         "names the best trial's model.")]
SeedOpt = Annotated[int, typer.Option(
    help="Seed of the sampler (each trial trains with the train default seed).")]
FixedStr = Annotated[str | None, typer.Option(help="Fixed for every trial.")]
FixedInt = Annotated[int | None, typer.Option(help="Fixed for every trial.")]
FixedFloat = Annotated[float | None, typer.Option(help="Fixed for every trial.")]


@group.callback()
def sweep(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="Dataset name.")] = None,
    trials: Annotated[int, typer.Option(help="Trials in all.")] = default(SweepSpec, "trials"),
    parallel: Annotated[int, typer.Option(
        help="Trials training at once.")] = default(SweepSpec, "parallel"),
    metric: MetricOpt = default(SweepSpec, "metric"),
    space: SpaceOpt = None,
    pruner: Annotated[str, typer.Option(
        help="median, asha or none.")] = default(SweepSpec, "pruner"),
    sampler: Annotated[str, typer.Option(
        help="tpe, random or grid.")] = default(SweepSpec, "sampler"),
    seed: SeedOpt = default(SweepSpec, "seed"),
    register: RegisterOpt = None,
    model: FixedStr = None, epochs: FixedInt = None, batch_size: FixedInt = None,
    lr: FixedFloat = None, scale: FixedFloat = None, augment: FixedStr = None,
    channels: FixedInt = None, precision: FixedStr = None, time_limit: FixedInt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a sweep: TRIALS trainings, PARALLEL at once, each drawn by the sampler from
    what the earlier ones reached; a trial below the pruner's bar stops at its epoch's
    end. The best trial's model gets the registry alias `best`."""
    if ctx.invoked_subcommand is not None:
        return
    from scheduler.plan import plan_sweep
    from shared.dispatch import send_job

    if dataset is None:
        raise SpecError("--dataset is required (or a subcommand: show)")
    given = dict(zip(FIXED, (model, epochs, batch_size, lr, scale, augment, channels,
                             precision, time_limit), strict=True))
    job_id = plan_sweep(dataset=dataset, trials=trials, parallel=parallel, metric=metric,
                        space=space or [], pruner=pruner, sampler=sampler, seed=seed,
                        register=register,
                        base={k: v for k, v in given.items() if v is not None})
    send_job(job_id)
    if not wait:
        if as_json:
            emit({"sweep": job_id, "status": "pending"}, True)
        else:
            console.print(f"sweep {job_id}; follow it with `captrain sweep show {job_id}`")
        return
    from scheduler import watch

    final = watch.wait(job_id, err_console if as_json else console, quiet=as_json)
    _show(job_id, as_json)
    if final != "done":
        raise typer.Exit(1)


def _show(job_id: int, as_json: bool) -> None:
    from scheduler.status import sweep_detail

    detail = sweep_detail(job_id)
    if as_json:
        emit(detail, True)
    else:
        show_sweep(detail)


@group.command("show")
def show(sweep_id: Annotated[str, typer.Argument(help="The sweep's id.")],
         as_json: JsonOpt = False) -> None:
    """The sweep's trials (number, state, value, params, run) and its best."""
    _show(parse_id(sweep_id, "sweep"), as_json)


@commands.command()
def sweeps(as_json: JsonOpt = False) -> None:
    """List sweeps, newest first."""
    from scheduler.status import list_sweeps

    rows: list[dict[str, Any]] = list_sweeps()
    emit(rows, as_json, ["sweep", "status", "dataset", "metric", "trials", "best",
                         "best_run", "created"], "sweeps", optional=["created", "best_run"])
