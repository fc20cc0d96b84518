"""``captrain serve``: an HTTP server reading captchas with a model, from the registry
(following its alias) or from an exported folder. Needs the ``serve`` extra; the
server itself lives in ``workers.serving``, imported when the command runs."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.errors import ConfigError, SpecError

commands = typer.Typer()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_model(ref: str) -> None:
    """Refuse, in one line, a reference that names no model, or a model the server
    cannot feed; the database must answer."""
    from shared.db import session_scope
    from shared.registry import resolve
    from shared.spec import TABULAR_MODELS

    with session_scope() as s:
        row = resolve(s, ref)
        cfg = row.config
        if cfg.get("arch") in TABULAR_MODELS:
            raise ConfigError(f"model {ref!r} ({row.name}@{row.version}) classifies Iris "
                              "rows; captrain serve reads captcha images")
        modality, prep = cfg.get("modality", "image"), cfg.get("preprocess", "resize")
        if modality != "image" or prep != "resize":
            raise ConfigError(f"model {ref!r} ({row.name}@{row.version}) reads {modality} "
                              f"input prepared by {prep!r}; captrain serve reads captcha "
                              "images (resize) only")


def _log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = {**LOGGING_CONFIG, "loggers": dict(LOGGING_CONFIG["loggers"])}
    config["loggers"]["captrain.serve"] = {"handlers": ["default"], "level": level.upper(),
                                           "propagate": False}
    return config


@commands.command()
def serve(
    model: Annotated[str | None, typer.Option(
        "--model", help="Registry reference: NAME, NAME@VERSION, NAME@ALIAS (followed as "
        "it moves), a run id or latest.")] = None,
    folder: Annotated[Path | None, typer.Option(
        "--from", help="Serve an exported folder (captrain export --format onnx); no "
        "database, no torch.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback needs "
                                      "CAPTRAIN_SERVE_API_KEY.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes.", min=1, max=64)] = 1,
    max_batch: Annotated[int, typer.Option(help="Most images in one model call.",
                                           min=1, max=1024)] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="Milliseconds a batch waits for more "
                                               "images after its first.", min=0,
                                               max=1000)] = 2.0,
    max_images: Annotated[int, typer.Option(help="Most images in one request.",
                                            min=1, max=1024)] = 64,
    max_body_mib: Annotated[float, typer.Option(help="Largest request body, MiB.",
                                                min=0.01, max=1024)] = 8.0,
    poll_seconds: Annotated[float, typer.Option(help="Seconds between looks at what "
                                                "--model names now.", min=0.1)] = 2.0,
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads per process "
                                                "(default: cores / workers).", min=1)] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = False,
) -> None:
    """Serve a model over HTTP: POST /v1/read, GET /v1/models, /healthz, /readyz,
    /metrics and /docs."""
    from shared.settings import get_settings

    if (model is None) == (folder is None):
        raise SpecError("name the model: --model REF or --from DIR (one of them)")
    key = get_settings().serve_api_key
    if not is_loopback(host) and not key:
        raise ConfigError(f"captrain serve would be open to the network on {host}: set "
                          "CAPTRAIN_SERVE_API_KEY (16 characters or more), or bind 127.0.0.1")
    try:
        import uvicorn

        from workers.serving.app import CONFIG_ENV, ServeConfig
        from workers.serving.runner import default_threads
    except ImportError as exc:
        raise ConfigError(f"captrain serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'captrain[serve]'") from exc
    config = ServeConfig(
        model=model, folder=str(folder.resolve()) if folder else None, max_batch=max_batch,
        max_wait_ms=max_wait_ms, max_images=max_images, max_body=int(max_body_mib * 2**20),
        poll_seconds=poll_seconds, threads=threads or default_threads(workers))
    if model is not None:
        _check_model(model)
    else:
        config.source()  # refuses a folder it cannot serve, in one line
    os.environ[CONFIG_ENV] = config.to_env()
    uvicorn.run("workers.serving.app:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_config=_log_config(log_level), log_level=log_level,
                access_log=access_log, server_header=False)
