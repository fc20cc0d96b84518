"""A sweep's search space: ``--space 'lr=loguniform(1e-4,1e-2)'`` and its siblings,
parsed and checked before anything is written.

Each dimension names a field of the train spec and how to draw it:

- ``uniform(a,b)``, ``loguniform(a,b)``: a float in [a, b] (``loguniform``: on a log
  scale, a > 0);
- ``int(a,b)``: an integer in [a, b];
- ``choice(v1,v2,...)``: one of the values, each read as an int, a float or a word.

Only fields that change what a trial learns are searchable (``SEARCHABLE``); every
value a dimension can take must make a valid ``TrainSpec``, so a trial can never be
refused after the sweep has started. Torch- and Optuna-free: the scheduler parses
here, and ``workers.jobs.sweeps`` turns dimensions into Optuna distributions.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from shared.errors import SpecError
from shared.spec import TrainSpec, validate

# The train-spec fields a sweep may draw, and the kinds of draw each takes.
SEARCHABLE = {
    "lr": ("uniform", "loguniform", "choice"),
    "batch_size": ("int", "choice"),
    "channels": ("int", "choice"),
    "model": ("choice",),
    "augment": ("choice",),
    "scale": ("uniform", "choice"),
}
KINDS = ("uniform", "loguniform", "int", "choice")
MAX_GRID = 10_000  # points a grid sweep may enumerate
_DIMENSION = re.compile(r"^\s*([a-z_]+)\s*=\s*([a-z]+)\s*\((.*)\)\s*$")


@dataclass(frozen=True)
class Dimension:
    """One searched field: ``kind`` is uniform, loguniform, int or choice; ``args`` the
    bounds (low, high) or the choices."""

    name: str
    kind: str
    args: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "args": list(self.args)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dimension:
        return cls(d["name"], d["kind"], tuple(d["args"]))

    def grid(self) -> list[Any]:
        """Every value of a grid sweep: the choices, or each integer of the range.
        Raises SpecError for a float range, which has no grid."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "int":
            return list(range(self.args[0], self.args[1] + 1))
        raise SpecError(f"--sampler grid needs choice() or int() dimensions; {self.name} "
                        f"is {self.kind}()")

    def extremes(self) -> list[Any]:
        """The values that bound what this dimension can draw."""
        return list(self.args)


def _value(text: str) -> Any:
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_dimension(text: str) -> Dimension:
    """``name=kind(args)`` as a Dimension. Raises SpecError with what is wrong."""
    m = _DIMENSION.match(text)
    if m is None:
        raise SpecError(f"--space {text!r} is not NAME=KIND(ARGS), e.g. "
                        "'lr=loguniform(1e-4,1e-2)'")
    name, kind, body = m.groups()
    if name not in SEARCHABLE:
        raise SpecError(f"--space {text!r}: {name} cannot be searched; searchable: "
                        f"{', '.join(SEARCHABLE)}")
    if kind not in KINDS:
        raise SpecError(f"--space {text!r}: unknown kind {kind}(); use one of "
                        f"{', '.join(k + '()' for k in KINDS)}")
    if kind not in SEARCHABLE[name]:
        raise SpecError(f"--space {text!r}: {name} takes "
                        f"{' or '.join(k + '()' for k in SEARCHABLE[name])}, not {kind}()")
    args = tuple(_value(a) for a in body.split(",")) if body.strip() else ()
    if kind == "choice":
        if len(args) < 1 or any(a == "" for a in args):
            raise SpecError(f"--space {text!r}: choice() needs values, comma-separated")
        if len(set(args)) != len(args):
            raise SpecError(f"--space {text!r}: choice() repeats a value")
        return Dimension(name, kind, args)
    if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
        raise SpecError(f"--space {text!r}: {kind}() needs two numbers, low and high")
    low, high = args
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise SpecError(f"--space {text!r}: int() needs whole numbers")
    if not low < high:
        raise SpecError(f"--space {text!r}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"--space {text!r}: loguniform() needs a low above 0")
    if kind in ("uniform", "loguniform"):
        low, high = float(low), float(high)
    return Dimension(name, kind, (low, high))


def parse_space(texts: list[str], base: dict[str, Any], grid: bool = False
                ) -> list[Dimension]:
    """The dimensions of ``--space`` texts, each value checked against ``base`` (the
    fixed train-spec values: dataset, epochs, ...). Raises SpecError."""
    if not texts:
        raise SpecError("a sweep needs at least one --space dimension")
    dims = [parse_dimension(t) for t in texts]
    names = [d.name for d in dims]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"--space names {twice[0]} twice")
    clash = sorted(set(names) & {k for k, v in base.items() if v is not None})
    if clash:
        raise SpecError(f"{clash[0]} is both searched (--space) and fixed (--{clash[0]})")
    for d in dims:
        for value in d.extremes():
            try:
                validate(TrainSpec, **{**base, d.name: value})
            except SpecError as exc:
                raise SpecError(f"--space {d.name}: the value {value!r} is not valid: "
                                f"{exc}") from None
    if grid and grid_size(dims) > MAX_GRID:
        raise SpecError(f"the grid has {grid_size(dims)} points; at most {MAX_GRID}")
    return dims


def grid_size(dims: list[Dimension]) -> int:
    """Points of the grid over ``dims``. Raises SpecError for a float dimension."""
    n = 1
    for d in dims:
        n *= len(d.grid())
    return n


def combinations(dims: list[Dimension], field: str) -> list[dict[str, Any]]:
    """Each combination of the values that bound ``field`` and the scale, which decide
    together whether a model fits a dataset (scale: None where not searched)."""
    by_name = {d.name: d for d in dims}
    fields = [f for f in (field, "scale") if f in by_name]
    return [dict(zip(fields, values, strict=True))
            for values in itertools.product(*(by_name[f].extremes() for f in fields))]
