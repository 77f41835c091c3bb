"""Declarative parameter validation, one wording for every message (in the spirit of
scikit-learn's ``_parameter_constraints``).

An estimator or config lists what each parameter may be; :func:`validate_params` checks the
values and raises one :class:`~wsi_ssl.errors.ConfigError` of the form::

    MILClassifier(epochs=0) must be an integer >= 1.
    TileSSLConfig(lr=nan) must be a number > 0.
    DemoConfig(device='gpu') must be one of 'auto', 'cpu', 'mps', 'cuda', 'cuda:N'.

A constraint is an :class:`Interval`, an :class:`Options` set, a :class:`Pattern`, a
:class:`Pair` ``(low, high)``, a :class:`SequenceOf` items, a type (``str``, ``bool``, a class),
or ``None`` (the value ``None`` is allowed). A parameter is valid when ANY of its constraints
accepts it.

    _parameter_constraints = {
        "epochs": [Interval(int, 1, None)],
        "lr": [Interval(float, 0, None, closed="neither")],
        "class_weight": [Options({"balanced"}), None],
    }
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection as CollectionABC
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from wsi_ssl.errors import ConfigError

__all__ = ["Interval", "Options", "Pattern", "Pair", "SequenceOf", "validate_params", "describe"]


@dataclass(frozen=True)
class Interval:
    """A real or integer number in ``[low, high]`` (``None`` = unbounded on that side).

    ``closed`` says which ends belong to the interval: ``"both"``, ``"left"``, ``"right"`` or
    ``"neither"``. ``kind=int`` accepts integers only (never ``bool``); ``kind=float`` accepts
    any finite real number (integers included).
    """

    kind: type
    low: float | None
    high: float | None
    closed: Literal["both", "left", "right", "neither"] = "both"

    def accepts(self, v: Any) -> bool:
        if isinstance(v, bool):
            return False
        if self.kind is int:
            if not isinstance(v, numbers.Integral):
                return False
        elif not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            return False
        lo_ok = self.low is None or (v >= self.low if self.closed in ("both", "left")
                                     else v > self.low)
        hi_ok = self.high is None or (v <= self.high if self.closed in ("both", "right")
                                      else v < self.high)
        return bool(lo_ok and hi_ok)

    def __str__(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo_incl = self.closed in ("both", "left")
        hi_incl = self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            left, right = "[" if lo_incl else "(", "]" if hi_incl else ")"
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{what} {'>=' if lo_incl else '>'} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<=' if hi_incl else '<'} {self.high:g}"
        return what


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: frozenset

    def __init__(self, values: Iterable[Any]) -> None:
        object.__setattr__(self, "values", frozenset(values))

    def accepts(self, v: Any) -> bool:
        try:
            return v in self.values and not isinstance(v, bool)
        except TypeError:  # unhashable
            return False

    def __str__(self) -> str:
        shown = [repr(v) for v in sorted(self.values, key=str)]
        return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)


@dataclass(frozen=True)
class Pattern:
    """A string matching a regular expression in full; ``shown`` is how the message names it."""

    regex: str
    shown: str

    def accepts(self, v: Any) -> bool:
        return isinstance(v, str) and re.fullmatch(self.regex, v) is not None

    def __str__(self) -> str:
        return self.shown


@dataclass(frozen=True)
class Pair:
    """A range ``(low, high)``: two values accepted by ``item`` with ``low <= high``."""

    item: Interval

    def accepts(self, v: Any) -> bool:
        if isinstance(v, (str, bytes)) or not isinstance(v, CollectionABC) or len(v) != 2:
            return False
        lo, hi = v
        return self.item.accepts(lo) and self.item.accepts(hi) and lo <= hi

    def __str__(self) -> str:
        return f"a pair (low, high) with low <= high, each {self.item}"


@dataclass(frozen=True)
class SequenceOf:
    """A list or tuple of at least ``min_len`` items, each accepted by ``item``."""

    item: Any
    min_len: int = 1

    def accepts(self, v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) >= self.min_len
                and all(_accepts(self.item, x) for x in v))

    def __str__(self) -> str:
        size = "non-empty" if self.min_len <= 1 else f"at least {self.min_len}-long"
        return f"a {size} sequence, each item {describe([self.item])}"


def _accepts(c: Any, v: Any) -> bool:
    if c is None:
        return v is None
    if isinstance(c, type):
        return isinstance(v, c) and (c is bool or not isinstance(v, bool))
    return c.accepts(v)


def describe(constraints: Iterable[Any]) -> str:
    """The wording of what a parameter may be: ``"an integer >= 1 or None"``."""
    words = []
    for c in constraints:
        if c is None:
            words.append("None")
        elif isinstance(c, type):
            words.append({str: "a non-empty string", bool: "True or False"}.get(
                c, f"a {c.__name__}"))
        else:
            words.append(str(c))
    return " or ".join(words)


def validate_params(owner: str, params: Mapping[str, Any],
                    constraints: Mapping[str, Iterable[Any]], *, hint: str = "") -> None:
    """Check ``params`` against ``constraints``; raise one :class:`ConfigError` naming the owner,
    the parameter, its value and what it must be (the first offending parameter, in the order
    of ``constraints``). Parameters without a constraint are not checked; a ``str`` constraint
    also refuses the empty string."""
    for name, cons in constraints.items():
        if name not in params:
            continue
        cons = list(cons)
        v = params[name]
        ok = any(_accepts(c, v) for c in cons)
        if ok and isinstance(v, str) and v == "" and str in cons:
            ok = False
        if not ok:
            extra = f" {hint}" if hint else ""
            raise ConfigError(f"{owner}({name}={v!r}) must be {describe(cons)}.{extra}")
