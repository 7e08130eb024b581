"""The results store: ``RUN_DIR/episodes.jsonl``, one JSON object per evaluated test episode (contract C3).

Rows are appended as episodes finish, each in one ``write`` followed by fsync, so an interrupted run
loses at most the episode in flight, and a failed write (a full disk) leaves no part of a row. On
opening, a torn last line (a kill in the middle of a write) is cut off, and the keys of the rows already
there are loaded so that a resumed evaluation skips them: no row is ever written twice.
"""

import json
import math
from pathlib import Path

from benchmark.files import append_line
from registry.errors import DataError

__all__ = ["ResultsStore", "ROW_KEYS", "row_key", "read_jsonl", "mean_ci"]

ROW_KEYS = (
    "run_id", "method", "variant", "adaptation", "backbone", "benchmark", "source", "role", "split", "seed",
    "episode", "ways", "support", "query", "accuracy", "seconds", "peak_memory_mib", "config_hash", "code_version",
)


def row_key(row):
    """What identifies a row within a run: (adaptation, source, split, seed, episode)."""
    return (row["adaptation"], row["source"], row["split"], int(row["seed"]), int(row["episode"]))


def read_jsonl(path, fix, repair=False):
    """[(line number, object)] of the JSON-lines file ``path`` ([] when it is missing).

    An unfinished last line (no newline: a write cut short, or one in flight) is left out; with ``repair``
    it is cut off the file, so that the next line appended starts a line of its own.

    Raises:
        DataError: naming ``path:line`` for any other line that is not a JSON object, with ``fix``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    numbered = []
    for number, line in enumerate(complete.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
            value = err
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: not a JSON object, the file is damaged; {fix}")
        numbered.append((number, value))
    return numbered


def mean_ci(values):
    """(mean, 95% CI half-width) with CI = 1.96 · std / √n and std with ddof = 0."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, 1.96 * std / math.sqrt(n)


class ResultsStore:
    """Append-only rows of one run directory.

    Args:
        path: the ``episodes.jsonl`` file (created with its directory if missing).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fix = "delete that line (its episode is evaluated again when the run resumes)"
        self.rows = [row for _, row in read_jsonl(self.path, fix, repair=True)]
        self._keys = {row_key(r) for r in self.rows}

    def __contains__(self, key):
        return key in self._keys

    def append(self, row):
        """Write ``row`` (must hold every `ROW_KEYS` key) unless a row with its key is already there.

        Raises:
            DataError: the write failed (e.g. a full disk); the file is as it was before.
        """
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row lacks {missing}")
        key = row_key(row)
        if key in self._keys:
            return False
        append_line(self.path, json.dumps(row, sort_keys=True), sync=True)
        self.rows.append(row)
        self._keys.add(key)
        return True
