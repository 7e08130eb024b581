"""The results store: ``RUN_DIR/episodes.jsonl``, one JSON object per evaluated test episode (contract C3).

Rows are appended as episodes finish, each in one ``write`` followed by flush and fsync, so an
interrupted run loses at most the episode in flight. On opening, a torn last line (a kill in the
middle of a write) is cut off, and the keys of the rows already there are loaded so that a resumed
evaluation skips them: no row is ever written twice.
"""

import json
import math
import os
from pathlib import Path

__all__ = ["ResultsStore", "ROW_KEYS", "row_key", "mean_ci"]

ROW_KEYS = (
    "run_id", "method", "variant", "adaptation", "backbone", "benchmark", "source", "role", "split", "seed",
    "episode", "ways", "support", "query", "accuracy", "seconds", "peak_memory_mib", "config_hash", "code_version",
)


def row_key(row):
    """What identifies a row within a run: (adaptation, source, split, seed, episode)."""
    return (row["adaptation"], row["source"], row["split"], int(row["seed"]), int(row["episode"]))


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
        self.rows = []
        if self.path.exists():
            data = self.path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):  # a torn last line from an interrupted write
                with open(self.path, "r+b") as f:
                    f.truncate(len(complete))
            self.rows = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
        self._keys = {row_key(r) for r in self.rows}

    def __contains__(self, key):
        return key in self._keys

    def append(self, row):
        """Write ``row`` (must hold every `ROW_KEYS` key) unless a row with its key is already there."""
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row lacks {missing}")
        key = row_key(row)
        if key in self._keys:
            return False
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self._keys.add(key)
        return True
