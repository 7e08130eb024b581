"""One door to every method: ``@register_method(name)``, ``create_method(name, **kw)``, ``list_methods(pattern)``.

A registered name identifies result rows, so registering a name twice raises (timm only warns).
Renamed methods keep their old names working through `_ALIASES`.

Example:
    >>> @register_method("mine")
    ... class Mine(Method): ...
    >>> method = create_method("mine", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
"""

import difflib
import fnmatch

import gin

from registry.errors import DataError

__all__ = ["register_method", "create_method", "list_methods", "is_method", "method_class"]

_METHODS = {}
_ALIASES = {}  # old name -> current name, so old gin files and result rows still resolve


def register_method(name):
    """Class decorator: register ``cls`` as method ``name``, gin-configurable as ``name`` (e.g. ``smat.num_experts``).

    Method constructors are where gin injects values (they are the edge of the system), so Python
    calls through `create_method` receive the bindings too.
    """

    def wrap(cls):
        if name in _METHODS or name in _ALIASES:
            raise ValueError(f"method name {name!r} is already registered (by {_METHODS.get(name)})")
        cls.name = name
        _METHODS[name] = gin.configurable(name, module="methods")(cls)
        return _METHODS[name]

    return wrap


def method_class(name):
    """The class registered under ``name`` (or an alias of it); unknown names list the close matches."""
    name = _ALIASES.get(name, name)
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"choose one of {', '.join(sorted(_METHODS))}"
        raise DataError(f"unknown method {name!r}; {hint}")
    return _METHODS[name]


def create_method(name, **kwargs):
    """Build method ``name`` with ``kwargs`` (gin bindings fill the rest); ``None`` kwargs are dropped."""
    return method_class(name)(**{k: v for k, v in kwargs.items() if v is not None})


def list_methods(pattern="*"):
    """Registered method names matching an fnmatch ``pattern``, sorted."""
    return sorted(n for n in _METHODS if fnmatch.fnmatch(n, pattern))


def is_method(name):
    return _ALIASES.get(name, name) in _METHODS
