"""Files written whole or not at all, and lines appended whole or not at all.

A write that fails (a full disk, a lost mount) is one `DataError` naming the file: the file keeps what it
held before, and no temporary file is left beside it.
"""

import json
import os
from pathlib import Path

from registry.errors import DataError

__all__ = ["write_json", "write_text", "append_line", "write_failed"]


def write_failed(path, err):
    """The `DataError` of a failed write of ``path``: what failed, and that the same command then continues."""
    why = err.strerror or str(err) if isinstance(err, OSError) else " ".join(str(err).split())
    return DataError(f"{path}: cannot write it ({why}); free space or fix the disk, then run the same command again "
                     "(what was written before is kept)")


def write_text(path, text):
    """Write ``text`` to ``path`` atomically, via a hidden ``.NAME.tmp`` beside it and ``os.replace``: a reader,
    or a run stopped meanwhile, sees the old file or the new one, never part of one.

    Raises:
        DataError: the write failed (`write_failed`); the old file is untouched and the temporary one removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, err) from None


def write_json(path, value, sort_keys=False):
    """Write ``value`` as JSON (indent 1) to ``path`` atomically (`write_text`)."""
    write_text(path, json.dumps(value, indent=1, sort_keys=sort_keys) + "\n")


def append_line(path, line, sync=False):
    """Append ``line`` and a newline to ``path`` (then fsync when ``sync``).

    Raises:
        DataError: the write failed (`write_failed`); the file is cut back to its size before, so it never
            ends in part of a line.
    """
    data = memoryview((line + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, size)
            raise write_failed(path, err) from None
    finally:
        os.close(fd)
