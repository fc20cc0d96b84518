"""The layout's rules, checked over the source: one owner for every status, one
table of dataset kinds and model names, modules and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "scheduler", "workers")


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "migrations" not in p.parts]


def _status_writes(tree: ast.AST) -> list[int]:
    """Lines that assign a ``status``: ``x.status = ...`` (also in a tuple target),
    ``.values(status=...)`` and ``Model(status=...)``."""
    lines = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            for t in node.targets:
                targets += t.elts if isinstance(t, ast.Tuple) else [t]
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        lines += [t.lineno for t in targets
                  if isinstance(t, ast.Attribute) and t.attr == "status"]
        if isinstance(node, ast.Call):
            lines += [k.value.lineno for k in node.keywords if k.arg == "status"]
    return lines


def test_only_the_state_module_writes_a_status():
    owner = ROOT / "shared" / "state.py"
    writers = {str(p.relative_to(ROOT)): lines for p in _sources()
               if p != owner and (lines := _status_writes(ast.parse(p.read_text())))}
    assert writers == {}
    assert len(_status_writes(ast.parse(owner.read_text()))) > 20  # the check sees them


def test_the_status_scan_finds_each_form_of_write():
    code = ("job.status = 'done'\nrun.status = job.status = 'x'\na.b, c.status = 1, 2\n"
            "update(Job).values(status='failed')\nJob(kind='k', status='done')\n")
    assert _status_writes(ast.parse(code)) == [1, 2, 2, 3, 4, 5]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_readable_in_size(path):
    text = path.read_text()
    assert text.count("\n") <= 400
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno is not None and n.end_lineno - n.lineno >= 60
            and "html" not in n.name]
    assert long == []


def test_model_names_are_defined_once_and_every_table_agrees():
    from shared.kinds import KINDS
    from shared.spec import IMAGE_MODELS, MIN_INPUT, TABULAR_MODELS, ModelName
    from workers.models import NETWORKS

    assert set(get_args(ModelName)) == set(IMAGE_MODELS + TABULAR_MODELS)
    assert set(NETWORKS) == set(MIN_INPUT) == set(IMAGE_MODELS)
    for kind in KINDS.values():
        assert kind.models and set(kind.models) <= set(get_args(ModelName)), kind.name


def _kind_tests(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing a dataset's ``kind`` (``ds.kind``, ``dataset.kind``, ``kind``)
    with a kind's name. A generate spec's ``kind`` (image or audio, what to render)
    and a model's ``modality`` are other ideas."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any(isinstance(c, ast.Constant) and c.value in names for c in sides)
        kind = any((isinstance(c, ast.Attribute) and c.attr == "kind"
                    and not (isinstance(c.value, ast.Name) and c.value.id in ("spec", "self")))
                   or (isinstance(c, ast.Name) and c.id == "kind") for c in sides)
        if named and kind:
            lines.append(node.lineno)
    return lines


def test_no_module_outside_the_kinds_table_tests_a_dataset_kind_by_name():
    from shared.kinds import KINDS

    names = set(KINDS)
    assert _kind_tests(ast.parse("if ds.kind == 'iris': pass\nkind != 'audio'"), names) == [1, 2]
    found = [f"{path.relative_to(ROOT)}:{line}" for path in _sources()
             if path.name != "kinds.py"
             for line in _kind_tests(ast.parse(path.read_text()), names)]
    assert found == []
