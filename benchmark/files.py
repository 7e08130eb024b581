"""Files written whole or not at all."""

import json
import os
from pathlib import Path

__all__ = ["write_json"]


def write_json(path, value, sort_keys=False):
    """Write ``value`` as JSON (indent 1) to ``path`` atomically, via a hidden ``.NAME.tmp`` beside it and
    ``os.replace``: a reader, or a run stopped meanwhile, sees the old file or the new one, never part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)
