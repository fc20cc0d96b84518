"""The ``captrain`` command line: thin commands over planning, submission and status.

A user's mistake prints one ``error:`` line and exits non-zero, with no traceback.
People get rich tables and progress bars; scripts get ``--json``.

The commands live by area (services, data, training, jobs, analysis, models, export,
serve, sweeps); what they print lives in ``render``. Here they become one ``app``, and
every CaptrainError becomes its exit code.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from scheduler.cli import (
    analysis,
    data,
    export,
    jobs,
    models,
    serve,
    services,
    sweeps,
    training,
)
from scheduler.cli.render import err_console
from shared.errors import CaptrainError

__all__ = ["app", "main"]


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
for _area in (services, data, training, jobs, analysis, models, serve, export, sweeps):
    app.registered_commands.extend(_area.commands.registered_commands)
app.add_typer(services.db_commands, name="db", cls=_Group)
app.add_typer(models.group, name="models", cls=_Group)
app.add_typer(sweeps.group, name="sweep", cls=_Group)


def main() -> None:
    """The ``captrain`` console script."""
    app()
