"""Methods behind one interface: Pre, PMF, SoftMerge and SMAT (with its Table 2 ablations).

``create_method(name, backbone=...)`` is the only way in; ``list_methods('s*')`` finds them. A new
method is one file that subclasses `Method` and registers itself, plus one gin file.
"""

from methods import pmf, pre, smat, softmerge  # noqa: F401  (registration)
from methods._registry import create_method, is_method, list_methods, method_class, register_method
from methods.backbones import MINI_BACKBONE, create_backbone
from methods.base import Method, Task, TaskModel

__all__ = [
    "MINI_BACKBONE",
    "Method",
    "Task",
    "TaskModel",
    "create_backbone",
    "create_method",
    "is_method",
    "list_methods",
    "method_class",
    "register_method",
]
