"""The services around the jobs: the embedded Redis, the database schema, workers,
Flower, and the end-to-end demo on local workers."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from scheduler.cli.args import JsonOpt
from scheduler.cli.render import console, emit, show_settings
from shared.errors import ConfigError

commands = typer.Typer()
db_commands = typer.Typer(no_args_is_help=True, help="Database schema.")


@commands.command()
def up() -> None:
    """Start the embedded Redis (a no-op when CAPTRAIN_BROKER_URL is set)."""
    from shared import embedded
    from shared.settings import get_settings

    s = get_settings()
    if not s.embedded_broker:
        console.print("CAPTRAIN_BROKER_URL is set; nothing to start")
        return
    started = embedded.start(s)
    console.print(f"embedded Redis {'started' if started else 'already running'} "
                  f"at {s.redis_socket}")


@commands.command()
def down() -> None:
    """Stop the embedded Redis."""
    from shared import embedded
    from shared.settings import get_settings

    stopped = embedded.stop(get_settings())
    console.print("embedded Redis stopped" if stopped else "embedded Redis was not running")


@commands.command()
def info(as_json: JsonOpt = False) -> None:
    """Show the settings in use, passwords redacted."""
    from shared import embedded
    from shared.settings import get_settings

    s = get_settings()
    data = s.redacted()
    data["embedded_broker"] = s.embedded_broker
    data["embedded_broker_running"] = embedded.is_running(s) if s.embedded_broker else None
    if as_json:
        emit(data, True)
    else:
        show_settings(data)


@db_commands.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the schema migrations."""
    from alembic.util import CommandError
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from shared import migrate
    from shared.settings import get_settings

    engine = create_engine(get_settings().effective_database_url)
    try:
        migrate.upgrade(engine, revision)
        console.print(f"database at {migrate.current_revision(engine)}")
    except (SQLAlchemyError, CommandError) as exc:
        raise ConfigError(f"cannot upgrade the database: {str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()


@db_commands.command("current")
def db_current() -> None:
    """Print the schema revision of the database."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from shared import migrate
    from shared.settings import get_settings

    engine = create_engine(get_settings().effective_database_url)
    try:
        console.print(f"{migrate.current_revision(engine)} (head {migrate.head_revision()})")
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the database: {str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()


@commands.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
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
    from shared.settings import get_settings

    bad = [q for q in queues.split(",") if q not in ("cpu", "gpu")]
    if bad:
        raise ConfigError(f"unknown queue {bad[0]!r}; queues are cpu and gpu")
    get_settings()  # a malformed setting is one error line here, not a worker traceback
    argv = worker_argv(queues, concurrency, name, loglevel) + list(ctx.args)
    sys.stdout.flush()
    os.execv(argv[0], argv)


@commands.command()
def flower(
    port: Annotated[int, typer.Option(help="HTTP port.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option(
        help="user:password; better set CAPTRAIN_FLOWER_BASIC_AUTH, which no `ps` shows."
    )] = None,
) -> None:
    """Run Flower for the captrain app: workers, tasks and progress, live."""
    import ipaddress

    from shared.settings import get_settings

    auth = basic_auth or get_settings().flower_basic_auth
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


@commands.command()
def workers(
    as_json: JsonOpt = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for replies.")] = 2.0,
) -> None:
    """List live workers and what they run (Celery inspect)."""
    from kombu.exceptions import OperationalError as KombuOperationalError
    from redis.exceptions import RedisError

    from shared.dispatch import inspector

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
    emit(rows, as_json, ["worker", "queues", "active", "tasks"], "workers")


@commands.command()
def demo(
    quick: Annotated[bool, typer.Option(help="A sub-minute smoke version.")] = False,
    count: Annotated[int | None, typer.Option(help="Captchas to generate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    budget: Annotated[float, typer.Option(
        help="Seconds the demo should take; its size is planned from a speed check "
             "to fit them.", min=60)] = 360,
) -> None:
    """Generate, train, evaluate and predict end to end on local workers."""
    from scheduler.demo import run_demo

    run_demo(console, quick=quick, count=count, epochs=epochs, budget=budget)
