"""The run directory: one process holds it at a time, and it records what its rows depend on beyond the config.

* ``RUN_DIR/.run.lock``: the exclusive ``flock`` of the process that runs in it (rank 0 of a distributed
  run, whose other ranks write nothing there); the file names that process (pid, host, start time).
  The lock goes with the process, however it ends.
* ``RUN_DIR/fingerprints.json``: per source of the benchmark, the SHA-256 of its ``dataset_spec.json`` and
  of its records' content fingerprints (`benchmark.episodes.SourceRecords.class_content`, 16 bytes of
  framing per record; from the decoded cache when the run reads one), and per checkpoint of the run its
  SHA-256. Every start compares them with what is there now and refuses a run whose records or
  checkpoints changed. To keep this cheap, the size and modification time of every class file are
  recorded too: while they are unchanged the content is not fingerprinted again.
"""

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from benchmark.files import write_json
from registry.dataset_spec import SPEC_FILENAME
from registry.errors import DataError

__all__ = ["LOCK", "FINGERPRINTS", "BEFORE_THE_RUN", "locked", "file_sha256", "check_records", "check_checkpoints",
           "replace_checkpoint"]

LOCK = ".run.lock"
FINGERPRINTS = "fingerprints.json"
# What a run directory may hold before its config.gin: the lock, a config.gin being written, and the submitit
# folder (job pickles and logs) that ``slurm.launch`` makes there before its job starts the run.
BEFORE_THE_RUN = (LOCK, ".config.gin.tmp", "submitit")


@contextlib.contextmanager
def locked(directory):
    """Hold ``directory``'s exclusive lock (created with the directory if missing) for the block.

    Raises:
        DataError: another process holds it; the message names that process.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that is starting"
            raise DataError(f"{directory} is in use by {holder}; wait for that run to end (or stop it), or choose "
                            "another --out") from None
        f.truncate(0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n")
        f.flush()
        yield  # closing the file releases the lock


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load(directory):
    path = Path(directory) / FINGERPRINTS
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise DataError(f"{path}: not valid JSON; restore it from a copy, or start the run again with another "
                        "--out") from None
    return recorded if isinstance(recorded, dict) else {}


def _file_states(records):
    """SHA-256 of the size and modification time of every class file of a source (None for a missing one)."""
    states = []
    for c in range(records.spec.num_classes):
        try:
            stat = os.stat(records.spec.class_path(c))
            states.append([stat.st_size, stat.st_mtime_ns])
        except FileNotFoundError:
            states.append(None)
    return hashlib.sha256(json.dumps(states).encode()).hexdigest()


def _contents(records):
    """SHA-256 of the content fingerprints of every class of a source, in class order."""
    fingerprints = [records.class_content(c) for c in range(records.spec.num_classes)]
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()


def check_records(directory, data):
    """Record the specs and records of ``data``'s sources in ``directory``, or check them against those recorded.

    Args:
        directory: the run directory.
        data: the run's `benchmark.episodes.BenchmarkData`.

    Raises:
        DataError: a source's spec or records differ from those the run was made from.
    """
    recorded = _load(directory)
    before_root = recorded.get("records_root")
    fix = (f"point SMAT_BENCH_RECORDS (or run.records_root) back at the records the run was made from ({before_root}), "
           "or start a new run with another --out")
    sources = {}
    for name, records in data.sources.items():
        before = recorded.get("sources", {}).get(name, {})
        now = dict(spec_sha256=file_sha256(Path(records.spec.path, SPEC_FILENAME)), files=_file_states(records))
        if before and before.get("spec_sha256") != now["spec_sha256"]:
            raise DataError(f"{directory}: the dataset spec of source '{name}' ({records.spec.path}/{SPEC_FILENAME}) "
                            f"is not the one this run was made from ({FINGERPRINTS}); {fix}")
        unchanged = before and before.get("files") == now["files"]
        now["records_sha256"] = before["records_sha256"] if unchanged else _contents(records)
        if before and before.get("records_sha256") != now["records_sha256"]:
            raise DataError(f"{directory}: the records of source '{name}' under {records.spec.path} are not those "
                            f"this run was made from ({FINGERPRINTS}); {fix}")
        sources[name] = now
    updated = {**recorded, "records_root": str(data.records_root), "sources": sources}
    if updated != recorded:
        write_json(Path(directory) / FINGERPRINTS, updated, sort_keys=True)


def check_checkpoints(directory):
    """Check every checkpoint the run recorded against its SHA-256 (then only the file's own is accepted).

    Raises:
        DataError: a checkpoint is not the file the run wrote (changed or damaged since).
    """
    recorded = _load(directory)
    checkpoints = recorded.get("checkpoints", {})
    for name, accepted in list(checkpoints.items()):
        path = Path(directory) / name
        digest = file_sha256(path) if path.exists() else None
        if digest is not None and digest not in accepted:
            raise DataError(f"{path}: its SHA-256 is not that of the checkpoint this run wrote ({FINGERPRINTS}): the "
                            "file was changed or damaged since, and rows from it would not be this run's; restore it "
                            "from a copy, or start the run again with another --out")
        checkpoints[name] = [digest] if digest else accepted  # a replacement stopped half-way: the file it left
    if checkpoints:
        write_json(Path(directory) / FINGERPRINTS, recorded, sort_keys=True)


def replace_checkpoint(directory, tmp, path):
    """Move the written checkpoint ``tmp`` to ``path`` and record its SHA-256.

    While the file is replaced both the old and the new SHA-256 are recorded, so a run stopped at any
    moment finds its checkpoint accepted.
    """
    name, digest = Path(path).relative_to(directory).as_posix(), file_sha256(tmp)
    recorded = _load(directory)
    checkpoints = recorded.setdefault("checkpoints", {})
    checkpoints[name] = [digest, *checkpoints.get(name, [])[:1]]
    write_json(Path(directory) / FINGERPRINTS, recorded, sort_keys=True)
    os.replace(tmp, path)
    checkpoints[name] = [digest]
    write_json(Path(directory) / FINGERPRINTS, recorded, sort_keys=True)
