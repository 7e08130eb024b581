"""The ranges of configured values, checked before a run claims its directory: a value outside its range is
one `DataError` that names its gin binding and says what to give.

A class checks its arguments when it is built (``check(self.name, locals(), RULES)``, first thing in its
constructor); a function that a run first calls after its directory is claimed (an adapter, a fast-path
switch) is registered with `configurable`, and `check_bindings` checks what gin binds for it.

Example:
    >>> check("smat", dict(num_experts=0), dict(num_experts=integer(1)))
    Traceback (most recent call last):
    registry.errors.DataError: smat.num_experts = 0: give an integer >= 1
"""

import math
from typing import Callable, NamedTuple

import gin

from registry.errors import DataError

__all__ = ["Rule", "FLAG", "integer", "number", "one_of", "optional", "tuple_of", "check", "configurable",
           "check_bindings"]


class Rule(NamedTuple):
    """What a setting accepts (``accepts(value)``) and the words that say so (``an integer >= 1``)."""

    accepts: Callable[[object], bool]
    text: str


def _real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low):
    """An int >= ``low`` (not a bool)."""
    return Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}")


def number(low, high=math.inf, ends="[]"):
    """A finite real number between ``low`` and ``high``; ``ends`` says which ends are included ("[" or "]")
    and which excluded ("(" or ")"), e.g. ``number(0, 1, "[)")`` is [0, 1) and ``number(0, ends="(]")`` is > 0."""
    above = (lambda v: v > low) if ends[0] == "(" else (lambda v: v >= low)
    below = (lambda v: v < high) if ends[1] == ")" else (lambda v: v <= high)
    text = (f"a number {'>' if ends[0] == '(' else '>='} {low}" if high == math.inf
            else f"a number in {ends[0]}{low}, {high}{ends[1]}")
    return Rule(lambda v: _real(v) and above(v) and below(v), text)


def one_of(*choices):
    """One of ``choices``, of the same type (``True`` is not ``1``)."""
    words = [repr(c) for c in choices]
    return Rule(lambda v: any(type(v) is type(c) and v == c for c in choices),
                " or ".join(words) if len(words) < 3 else f"one of {', '.join(words)}")


FLAG = one_of(True, False)


def optional(rule):
    """What ``rule`` accepts, or None."""
    return Rule(lambda v: v is None or rule.accepts(v), f"{rule.text} or None")


def tuple_of(rule):
    """A non-empty tuple (or list) of distinct values that ``rule`` accepts."""
    return Rule(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(map(rule.accepts, v))
                and len(set(v)) == len(v), f"a non-empty tuple of distinct values, each {rule.text}")


def check(owner, values, rules):
    """Raise `DataError` ``OWNER.NAME = VALUE: give RULE`` for the first of ``values`` (a mapping: a
    constructor's ``locals()``, gin's bindings) that its rule in ``rules`` refuses; names without a rule,
    or not in ``values``, are not checked."""
    for name, rule in rules.items():
        if name in values and not rule.accepts(values[name]):
            raise DataError(f"{owner}.{name} = {values[name]!r}: give {rule.text}")


_LATER = {}  # gin name -> {parameter: Rule} of the functions registered by `configurable`


def configurable(name, module, **rules):
    """``gin.configurable(name, module=module)`` for a function that runs after the run directory is claimed;
    `check_bindings` checks its bound parameters against ``rules`` before that."""
    _LATER[name] = rules
    return gin.configurable(name, module=module)


def check_bindings():
    """Check the gin bindings of every function registered by `configurable` (`check`)."""
    for name, rules in _LATER.items():
        check(name, gin.get_bindings(name), rules)
