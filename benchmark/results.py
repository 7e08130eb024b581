"""The results store: ``RUN_DIR/episodes.jsonl``, one JSON object per evaluated test episode (contract C3).

Rows are appended as episodes finish, each in one ``write`` followed by fsync, so an interrupted run
loses at most the episode in flight, and a failed write (a full disk) leaves no part of a row. On
opening, a torn last line (a kill in the middle of a write) is cut off, and the keys of the rows already
there are loaded so that a resumed evaluation skips them: no row is ever written twice, and a reader
(`read_rows`) counts each episode once even in a file two processes once wrote to. A row is keyed by
its run id and config hash too: a store opened for a run refuses the rows of another run or config.
"""

import json
import math
from pathlib import Path

from benchmark.files import append_line
from registry.errors import DataError

__all__ = ["ResultsStore", "ROW_KEYS", "row_key", "read_jsonl", "read_rows", "mean_ci"]

ROW_KEYS = (
    "run_id", "method", "variant", "adaptation", "backbone", "benchmark", "source", "role", "split", "seed",
    "episode", "ways", "support", "query", "accuracy", "seconds", "peak_memory_mib", "config_hash", "code_version",
)
KEY_FIELDS = ("run_id", "config_hash", "adaptation", "source", "split", "seed", "episode")


def row_key(row):
    """What identifies a row: (run_id, config_hash, adaptation, source, split, seed, episode)."""
    return (row["run_id"], row["config_hash"], row["adaptation"], row["source"], row["split"], int(row["seed"]),
            int(row["episode"]))


def read_jsonl(path, fix, repair=False):
    """[(line number, object)] of the JSON-lines file ``path`` ([] when it is missing).

    An unfinished last line (no newline: a write cut short, or one in flight) is left out; with ``repair``
    it is cut off the file, so that the next line appended starts a line of its own.

    Raises:
        DataError: naming ``path:line`` for any other line that is not a JSON object, with ``fix``; naming
            ``path`` when it cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror})") from None
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


def read_rows(path, run=None, repair=False):
    """The rows of the ``episodes.jsonl`` at ``path``, each episode once (its first row; `row_key`).

    Args:
        run: {"run_id", "config_hash"} of the run the file belongs to; a row of another is refused.
        repair: cut a torn last line off the file (`read_jsonl`); only its writer may.

    Raises:
        DataError: naming ``path:line``: a line that is not a JSON object, a row without the keys that
            identify it, or a row of another run or config.
    """
    fix = "delete that line (its episode is evaluated again when the run resumes)"
    rows, keys = [], set()
    for number, row in read_jsonl(path, fix, repair):
        missing = [k for k in KEY_FIELDS if k not in row]
        if missing:
            raise DataError(f"{path}:{number}: a result row without {', '.join(missing)}; {fix}")
        if run is not None and (row["run_id"], row["config_hash"]) != (run["run_id"], run["config_hash"]):
            raise DataError(
                f"{path}:{number}: a row of run {row['run_id']} (config hash {str(row['config_hash'])[:10]}), "
                f"not of this run {run['run_id']} (config hash {run['config_hash'][:10]}); a run directory holds "
                "the rows of one run: move that file away, or choose another --out"
            )
        key = row_key(row)
        if key not in keys:
            keys.add(key)
            rows.append(row)
    return rows


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
        run: {"run_id", "config_hash"} of the run that owns it: rows of another are refused (`read_rows`).
    """

    def __init__(self, path, run=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_rows(self.path, run, repair=True)
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
