"""The model registry: list versions, show one with its lineage, move an alias,
archive a version.

A reference is NAME (its newest version that is not archived), NAME@VERSION,
NAME@ALIAS, a run id or ``latest``; ``shared.registry`` resolves it. Commands that
change a version take it explicitly: NAME@VERSION or a run id.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from scheduler.cli.args import JsonOpt
from scheduler.cli.render import console, emit, test_line

commands = typer.Typer()
group = typer.Typer(invoke_without_command=True,
                    help="Model versions: list them, move an alias, archive a version.")

RefArg = Annotated[str, typer.Argument(
    help="NAME, NAME@VERSION, NAME@ALIAS, a run id or latest.")]
VersionArg = Annotated[str, typer.Argument(help="NAME@VERSION or a run id.")]
COLUMNS = ["name", "version", "aliases", "run", "seq_acc", "char_acc", "cv_acc", "archived",
           "created"]


@group.callback()
def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List every version of every model: aliases, test metrics, archived."""
    from scheduler.status import list_models

    if ctx.invoked_subcommand is not None:
        return
    rows = list_models()
    if as_json:
        emit(rows, True)
        return
    # Empty cells, not "[]" and "False": a column empty in every row is the first to
    # go on a narrow terminal; then the ones named optional, char_acc last (seq_acc
    # and cv_acc are the headline numbers), so that an alias is never cut in two.
    cells = [{**r, "aliases": ", ".join(r["aliases"]) or None,
              "archived": "yes" if r["archived"] else None} for r in rows]
    emit(cells, False, COLUMNS, "models", optional=["created", "run", "archived", "char_acc"])


@group.command("alias")
def alias_cmd(ref: VersionArg,
              alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
              as_json: JsonOpt = False) -> None:
    """Point ALIAS at a version, moving it from the version it named before."""
    from shared import registry
    from shared.db import session_scope

    with session_scope() as s:
        row = registry.set_alias(s, ref, alias)
        done = {"name": row.name, "version": row.version, "alias": alias}
    _said(done, as_json, f"{done['name']}@{alias} is now version {done['version']}")


def _archive(ref: str, archived: bool, as_json: bool) -> None:
    from shared import registry
    from shared.db import session_scope

    with session_scope() as s:
        row = registry.archive(s, ref, archived)
        done = {"name": row.name, "version": row.version, "archived": row.archived}
    word = "archived" if archived else "restored"
    _said(done, as_json, f"{done['name']}@{done['version']} {word}")


@group.command("archive")
def archive_cmd(ref: VersionArg,
                undo: Annotated[bool, typer.Option(
                    "--undo", help="Restore an archived version.")] = False,
                as_json: JsonOpt = False) -> None:
    """Archive a version: a bare NAME and latest pass it over; NAME@VERSION and its
    run id still read it. A version an alias names is refused."""
    _archive(ref, not undo, as_json)


@group.command("unarchive")
def unarchive_cmd(ref: VersionArg, as_json: JsonOpt = False) -> None:
    """Restore an archived version (as `archive --undo`)."""
    _archive(ref, False, as_json)


@commands.command()
def model(ref: RefArg, as_json: JsonOpt = False) -> None:
    """One model version with its test result and lineage."""
    from scheduler.status import model_detail

    d = model_detail(ref)
    if as_json:
        emit(d, True)
    else:
        show_model(d)


def _said(data: dict[str, Any], as_json: bool, line: str) -> None:
    if as_json:
        emit(data, True)
    else:
        console.print(line, highlight=False)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def show_model(d: dict[str, Any]) -> None:
    """A version: its row, then its lineage one fact a line (hashes and the full
    settings are in --json)."""
    emit({"model": d["ref"], "aliases": ", ".join(d["aliases"]) or None, "run": d["run"],
          "dataset": d["dataset"], "archived": "yes" if d["archived"] else None,
          "created": d["created"]}, False, optional=["created", "archived"])
    lin = d["lineage"]
    ds = lin.get("dataset") or {}
    rows: list[tuple[str, str]] = [
        ("dataset", f"{ds.get('name')} ({ds.get('kind')}, id {ds.get('id')})"),
        ("built by", f"job {ds['job']}: {_compact(ds.get('spec'))}" if ds.get("job")
         else "nothing recorded (built in, or registered by a migration)"),
    ]
    if ds.get("split_spec"):
        rows.append(("split by", f"job {ds['layout_job']}: {_compact(ds['split_spec'])}"))
    shards = ds.get("shards")
    rows += [
        ("shards", "not recorded" if shards is None else "none (not sharded)"
         if not shards else f"{len(shards)} of job {ds.get('layout_job')} (sha256 in --json)"),
        ("train spec", _compact(lin.get("train_spec"))),
        ("captrain", f"{lin.get('captrain_version')}, commit {lin.get('git_commit')}"),
        ("torch, captcha", f"{lin.get('torch_version')}, {lin.get('captcha_version')}"),
        ("device", f"{lin.get('device')}; speedups: "
         + (", ".join(k for k, on in (lin.get("speedups") or {}).items() if on) or "none")),
        ("settings", f"{len(lin.get('settings') or {})}, passwords redacted (--json)"),
    ]
    if d["test"]:
        rows.append(("test", test_line(d["test"])))
    table = Table(title="lineage")
    table.add_column("of", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
