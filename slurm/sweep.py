"""``python -m slurm.sweep``: a grid of ``benchmark.run`` jobs as ONE job array, with a manifest.

    python -m slurm.sweep --gin FILE [...] --grid 'smat.target_sparsity=[0.5, 0.7, 0.9]' [--grid ...] --out SWEEP_DIR
           [--array-parallelism K] [--wait] [every benchmark.run option] [the cluster options of slurm.launch] [--local]
    python -m slurm.sweep --status SWEEP_DIR[/sweep.json] [--wait]
    python -m slurm.sweep --resubmit-failed SWEEP_DIR[/sweep.json] [--wait]

Each ``--grid NAME=[v1, v2, ...]`` is a gin parameter and its values (Python literals; bare words are
strings); ``--grid 'gin=[methods/pmf.gin, methods/smat.gin]'`` varies a gin file instead. The
cartesian product is submitted as one job array (``executor.map_array``), at most K elements running
at once; point ``target_sparsity=0.5,num_experts=4`` runs in ``SWEEP_DIR/target_sparsity=0.5,num_experts=4``
with ``--bind 'smat.target_sparsity = 0.5' --bind 'smat.num_experts = 4'`` added to the command line.
Every point's gin config is parsed as its job will parse it, and the partition, GPUs and CPUs checked
with ``sinfo``, before anything is submitted; two points with the same config (an option such as
``--adapt`` overriding what the grid varies) are refused too. A refusal is one line and exit status 2.

``SWEEP_DIR/sweep.json`` (the manifest) maps each point to its bindings, command line, job id (and
earlier ids), run directory and last known status. ``--status`` prints every point's state (from
the job's result file, else ``sacct``) and the number of result rows in its run directory, and names
the failed points; ``--resubmit-failed`` resubmits only those (as one array; each resumes from its run
directory, in the directory the sweep was submitted from, so relative paths keep their meaning). Both
update the manifest under ``SWEEP_DIR/.sweep.lock``, so two at once never undo each other's changes;
``--wait`` blocks with a progress bar until every job ended, prints the summary and exits 1 when a
point failed. ``--local`` runs the points on this machine, K at a time (default 1), and waits.

A manifest is checked before anything is read: it must have the shape ``submit`` writes, and, since job
results are pickles (loading one runs its code), its ``sweep_dir`` must be the directory holding it and
its submitit folder and run directories must lie inside; else one line names the key, exit status 2.
"""

import ast
import contextlib
import datetime
import fcntl
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmark.files import write_json
from benchmark.results import read_rows
from registry.errors import CommandParser, DataError, exit_on_error
from slurm.cluster import check_local_request, check_request, make_executor
from slurm.launch import check_config, cluster_parser, parameters_from_args, run_argv, submit_jobs

__all__ = ["main", "submit", "status", "resubmit_failed", "wait", "parse_grid", "point_name", "build_parser"]

PROG = "python -m slurm.sweep"
MANIFEST = "sweep.json"
LOCK = ".sweep.lock"  # beside the manifest: held by every load-modify-save of it
FORMAT = 1
GIN = "gin"  # the grid key that varies a gin file
QUEUED = "QUEUED"  # a local point waiting for its turn in the process that runs the sweep (manifest "driver")
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "COMPLETING",
          "CONFIGURING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "READY", "UNKNOWN", QUEUED}
ASK_SQUEUE = {"UNKNOWN", "PREEMPTED"}  # sacct's answer alone is not final: squeue says whether the job is still held
POLL_S = 2.0


def sweep_parser():
    """The options only ``slurm.sweep`` has (a parent parser, no ``-h``)."""
    parser = CommandParser(add_help=False)
    group = parser.add_argument_group("sweep")
    group.add_argument("--grid", action="append", default=[], metavar="NAME=[V1, V2, ...]",
                       help="a gin parameter (or 'gin' for a gin file) and its values (repeatable: cartesian product)")
    group.add_argument("--array-parallelism", type=int, help="at most K array elements run at once")
    group.add_argument("--status", metavar="MANIFEST", help="show the progress of a sweep (SWEEP_DIR or its sweep.json)")
    group.add_argument("--resubmit-failed", metavar="MANIFEST", help="resubmit the failed points of a sweep")
    return parser


def build_parser():
    """The submission parser: ``benchmark.run``'s options, the cluster options, the sweep options."""
    from benchmark.run import build_parser as run_parser

    return CommandParser(
        prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        parents=[run_parser(), cluster_parser(), sweep_parser()], add_help=False,
        epilog="In a sweep, --out is the sweep directory (required): each grid point runs in SWEEP_DIR/<point name>, "
               "and SWEEP_DIR/sweep.json is the manifest that --status and --resubmit-failed read.")


def _manage_parser():
    parser = CommandParser(prog=PROG, description="follow or repair a submitted sweep")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--status", metavar="MANIFEST")
    what.add_argument("--resubmit-failed", metavar="MANIFEST")
    parser.add_argument("--wait", action="store_true")
    return parser


# --- the grid -------------------------------------------------------------------------------------------


def _values(text):
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # bare words: [methods/pmf.gin, methods/smat.gin]
        inner = text.strip()
        if not (inner.startswith("[") and inner.endswith("]")):
            return None
        values = []
        for item in inner[1:-1].split(","):
            try:
                values.append(ast.literal_eval(item.strip()))
            except (ValueError, SyntaxError):
                values.append(item.strip())
    return list(values) if isinstance(values, (list, tuple)) else None


def parse_grid(specs):
    """``['smat.num_experts=[4, 8]', ...]`` -> ``{'smat.num_experts': [4, 8], ...}`` (in order).

    Raises:
        DataError: a spec that is not ``NAME=[V1, V2, ...]`` with distinct values, or a repeated name.
    """
    grid = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        values = _values(text) if sep else None
        if not name or not values:
            raise DataError(f"--grid {spec}: expected NAME=[V1, V2, ...], e.g. --grid 'smat.num_experts=[4, 8]'")
        if name in grid:
            raise DataError(f"--grid {name} given twice; put all its values in one list")
        if len(set(map(repr, values))) != len(values):
            raise DataError(f"--grid {spec}: a value is repeated")
        grid[name] = values
    return grid


def point_name(point, grid):
    """A readable directory name: ``target_sparsity=0.5,num_experts=4`` (full names where the last parts clash)."""
    lasts = [n.rsplit(".", 1)[-1] for n in grid]
    parts = []
    for name, value in point.items():
        key = name.rsplit(".", 1)[-1] if lasts.count(name.rsplit(".", 1)[-1]) == 1 else name
        text = Path(str(value)).stem if name == GIN else value if isinstance(value, str) else repr(value)
        parts.append(f"{key}={text}")
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts))[:200]


def points_of(grid):
    """The cartesian product, first grid parameter slowest: a list of ``{name: value}``."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _point_argv(point):
    argv = []
    for name, value in point.items():
        argv += ["--gin", str(value)] if name == GIN else ["--bind", f"{name} = {value!r}"]
    return argv


# --- the manifest ---------------------------------------------------------------------------------------


def _manifest_path(path):
    path = Path(path)
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: no sweep manifest (give SWEEP_DIR or SWEEP_DIR/{MANIFEST})")
    return path


@contextlib.contextmanager
def _locked(path):
    """Hold the sweep's lock (``flock`` of ``.sweep.lock`` beside the manifest ``path``) for the block.

    Every load-modify-save of an existing manifest runs under it, so that ``--status`` never writes back the
    job ids a ``--resubmit-failed`` elsewhere just replaced. Not re-entrant: code under it never takes it
    again (a second ``flock`` in the same process would wait forever).
    """
    with open(path.with_name(LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# What --status, --wait and --resubmit-failed use of a manifest, and its JSON types (older manifests lack workdir).
_MANIFEST_TYPES = {"sweep_dir": (str,), "cluster": (str,), "folder": (str,), "parameters": (dict,), "points": (list,)}
_POINT_TYPES = {"name": (str,), "run_dir": (str,), "argv": (list,), "job_id": (str, type(None)), "jobs": (list,),
                "status": (str,), "rows": (int,)}
_JSON_NAMES = {str: "string", dict: "object", list: "array", int: "integer", type(None): "null"}
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")  # a SLURM job or array element, or a local process id


def _check(path, manifest):
    """Refuse a manifest without the shape `submit` writes, or one whose paths leave the sweep directory.

    The sweep directory is the one holding ``path``. Job results under ``folder`` are pickles, which run
    code when loaded, and resubmitted points write to their run directories: ``sweep_dir`` must be that
    directory, and ``folder`` and every ``run_dir`` (the ``--out`` that ends each point's ``argv``) must
    lie inside it; job ids, which name the result files, must be SLURM ids or process ids.

    Raises:
        DataError: one line naming the key, what it holds, and the fix.
    """
    def refuse(what):
        return DataError(f"{path}: {what}; not a sweep manifest as {PROG} writes it: restore the one it wrote, "
                         "or submit the sweep again")

    def check_types(table, types, where):
        for key, kinds in types.items():
            value = table.get(key)
            if key not in table or not isinstance(value, kinds) or isinstance(value, bool):
                found = f"is {json.dumps(value)[:60]}" if key in table else "is missing"
                raise refuse(f"{where}{key} {found}, expected a JSON {' or '.join(_JSON_NAMES[k] for k in kinds)}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise refuse(f"not a JSON object with \"format\": {FORMAT}")
    check_types(manifest, _MANIFEST_TYPES, "")
    if manifest["cluster"] not in ("local", "slurm"):
        raise refuse(f"cluster is {json.dumps(manifest['cluster'])[:60]}, expected \"local\" or \"slurm\"")
    if not isinstance(manifest.get("workdir", ""), str):
        raise refuse("workdir is not a string")
    if not isinstance(manifest.get("driver", 0), int) or isinstance(manifest.get("driver"), bool):
        raise refuse("driver is not a process id")
    if not manifest["points"]:
        raise refuse("points is empty")
    for i, entry in enumerate(manifest["points"]):
        if not isinstance(entry, dict):
            raise refuse(f"points[{i}] is {json.dumps(entry)[:60]}, expected a JSON object")
        check_types(entry, _POINT_TYPES, f"points[{i}].")
        if not all(isinstance(a, str) for a in entry["argv"]) or entry["argv"][-2:] != ["--out", entry["run_dir"]]:
            raise refuse(f"points[{i}].argv is not a list of strings ending with --out and the point's run_dir")
        for job_id in [entry["job_id"], *entry["jobs"]]:
            if job_id is not None and not (isinstance(job_id, str) and _JOB_ID.fullmatch(job_id)):
                raise refuse(f"points[{i}] has job id {json.dumps(job_id)[:60]}, expected one such as \"1234\" or "
                             "\"1234_5\"")
    home = path.parent.resolve()
    paths = [("folder", manifest["folder"])] + [(f"points[{i}].run_dir", e["run_dir"])
                                                for i, e in enumerate(manifest["points"])]
    outside = [(key, value) for key, value in paths if not Path(value).resolve().is_relative_to(home)]
    if Path(manifest["sweep_dir"]).resolve() != home:
        outside.insert(0, ("sweep_dir", manifest["sweep_dir"]))
    if outside:
        key, value = outside[0]
        raise DataError(
            f"{path}: {key} {value} is not the sweep directory {home} (the one holding {path.name}) or inside it; "
            f"{PROG} reads job results (pickles, which run code) and writes runs only there: put the whole sweep "
            "directory back where it was submitted, or submit the sweep again")


def load(path):
    """The manifest at ``path`` (SWEEP_DIR or its sweep.json), checked (`_check`); returns ``(path, manifest)``."""
    path = _manifest_path(path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a sweep manifest ({err})") from None
    _check(path, manifest)
    return path, manifest


def save(path, manifest):
    write_json(path, manifest)


# --- submission -----------------------------------------------------------------------------------------


def _own_parser():
    return CommandParser(add_help=False, parents=[cluster_parser(), sweep_parser()])


def submit(argv):
    """Check every point, submit the grid as one job array, write the manifest; returns its path.

    Each point's command line is parsed as its job will parse it (the sweep's options, the point's
    ``--gin`` / ``--bind``, then ``--smoke`` / ``--adapt``, which bind last).

    Raises:
        DataError: a bad grid, gin file or binding (for any point), two points with the same config (an
            option overrides what the grid varies), an unknown partition or submitit parameter, more GPUs or
            CPUs than a node has, an existing sweep in SWEEP_DIR, or sbatch refused the array; nothing was
            submitted.
    """
    from benchmark.run import build_parser as run_parser
    from benchmark.run import run_bindings

    args = build_parser().parse_args(argv)
    if not args.out:
        raise DataError("--out SWEEP_DIR is required: the sweep's run directories and manifest go there")
    if not args.grid:
        raise DataError("no --grid: give at least one, e.g. --grid 'smat.num_experts=[4, 8]'")
    sweep_dir = Path(args.out).absolute()
    manifest_path = sweep_dir / MANIFEST
    if manifest_path.exists():
        raise DataError(f"{manifest_path} exists: follow that sweep with --status / --resubmit-failed, "
                        "or choose another --out")
    grid = parse_grid(args.grid)
    base = run_argv(argv, _own_parser())
    points = points_of(grid)
    configs = {}  # gin's text of each point's config: the point that has it
    for point in points:
        name = point_name(point, grid)
        try:
            job_args = run_parser().parse_args(base + _point_argv(point))  # exactly what the job parses
            config = check_config(job_args.gin, run_bindings(job_args))
        except DataError as err:
            raise DataError(f"grid point {name}: {err}") from None
        if config in configs:
            raise DataError(f"grid points {configs[config]} and {name} run the same config: an option (--adapt, "
                            "--smoke, --bind) overrides what the grid varies; drop it or that --grid")
        configs[config] = name
    parameters = parameters_from_args(args, name=f"smat-sweep:{sweep_dir.name}",
                                      slurm_array_parallelism=args.array_parallelism)
    if args.local:
        check_local_request(parameters)
    else:
        parameters["slurm_partition"] = check_request(parameters)
    folder = sweep_dir / "submitit"
    executor = make_executor(folder, parameters, local=args.local)
    entries = []
    for point in points:
        name = point_name(point, grid)
        run_dir = sweep_dir / name
        entries.append(dict(name=name, values=point, run_dir=str(run_dir),
                            argv=base + _point_argv(point) + ["--out", str(run_dir)], job_id=None, jobs=[],
                            status="NOT SUBMITTED", rows=0))
    if len({e["name"] for e in entries}) != len(entries):
        for i, entry in enumerate(entries):
            entry["name"] = f"{i:03d}-{entry['name']}"[:200]
            entry["run_dir"] = str(sweep_dir / entry["name"])
            entry["argv"][-1] = entry["run_dir"]
    manifest = dict(format=FORMAT, sweep_dir=str(sweep_dir), command=shlex.join([*PROG.split(), *argv]),
                    workdir=os.getcwd(),
                    created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    cluster="local" if args.local else "slurm", folder=str(folder), grid=grid,
                    parameters=parameters, points=entries)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if args.local:
        save(manifest_path, manifest)
        _run_locally(manifest_path, manifest, executor, entries, args.array_parallelism or 1)
    else:
        _submit_entries(manifest, executor, entries)
        save(manifest_path, manifest)
    return manifest_path


def _submit_entries(manifest, executor, entries):
    """Submit ``entries`` as one array, run where the sweep was submitted (older manifests: here).

    A local job's id is its process id, which an earlier job of the sweep may have had: every earlier
    local job's state is read first, and the result file an earlier job left under the new id is removed
    (a process started an instant ago has written none yet).
    """
    local = manifest["cluster"] == "local"
    if local:
        _refresh_states(manifest)
    jobs = submit_jobs(executor, [e["argv"] for e in entries], manifest.get("workdir"))
    for entry, job in zip(entries, jobs):
        if local:
            _result_path(manifest["folder"], job.job_id).unlink(missing_ok=True)
        entry["job_id"] = str(job.job_id)
        entry["jobs"].append(entry["job_id"])
        entry["status"] = "PENDING"
    return jobs


def _run_locally(manifest_path, manifest, executor, entries, parallelism):
    """Run ``entries`` with the local executor, ``parallelism`` at a time, until all ended.

    Takes the sweep's lock only to save each new job id, so that ``--status`` elsewhere runs meanwhile.
    """
    manifest["driver"] = os.getpid()
    for entry in entries:
        entry["status"] = QUEUED
    with _locked(manifest_path):
        save(manifest_path, manifest)
    waiting, running = list(entries), []
    while waiting or running:
        running = [job for job in running if not job.done()]
        while waiting and len(running) < parallelism:
            running += _submit_entries(manifest, executor, [waiting.pop(0)])
            with _locked(manifest_path):
                save(manifest_path, manifest)
        time.sleep(0.5)


# --- status ---------------------------------------------------------------------------------------------


def _result_path(folder, job_id):
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=str(job_id), task_id=0).result_pickle


def _ended(folder, job_id):
    """``COMPLETED`` or ``FAILED`` as the job's result file (success, or error and traceback) says; None while
    it has none."""
    from submitit.core.utils import pickle_load

    try:
        outcome, _ = pickle_load(_result_path(folder, job_id))
    except (FileNotFoundError, EOFError):
        return None
    return "COMPLETED" if outcome == "success" else "FAILED"


def _runs(pid, program):
    """Whether process ``pid`` exists and, where ``/proc`` tells, runs ``program`` (bytes of its command line:
    ``b"submitit"`` for a local job, ``b"slurm.sweep"`` for a local sweep's driver), not one that got the id later."""
    try:
        os.kill(pid, 0)
    except OSError:  # no such process, or another user's
        return False
    if not Path("/proc/self").exists():  # no /proc on this system: the id alone must do
        return True
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended just now
        return False
    if command:
        return program in command
    try:  # empty while a process just started is still exec-ing, and always for a kernel thread, which has no exe
        os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return True


def _rows(run_dir):
    """The result rows in ``run_dir``, each episode once (`benchmark.results.read_rows`)."""
    return len(read_rows(Path(run_dir) / "episodes.jsonl"))


def _squeue_states(job_ids):
    """{job id: state} of the jobs slurmctld still holds (finished ones stay listed for a few minutes).

    Raises:
        DataError: squeue failed or timed out. An id slurmctld does not know is no failure, only left out
            (asked for alone, squeue exits 1 with "Invalid job id specified"; in a list it is skipped).
    """
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"squeue failed: {err}; job states unknown, try again") from None
    if result.returncode != 0 and "Invalid job id specified" not in result.stderr:
        why = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise DataError(f"squeue failed: {why}; job states unknown, try again")
    return dict(line.split("|", 1) for line in result.stdout.split() if "|" in line)


def _states(manifest, entries):
    """Each entry's state: its result file when there is one, else sacct, else squeue (slurm) or the process (local).

    A job neither sacct nor squeue knows and that left no result ended without one (an array element
    cancelled while pending has no accounting record at all): ``LOST``, a failure. A job sacct calls
    ``PREEMPTED`` is active while squeue holds it (requeued), else it ended: a failure.
    """
    states = {}
    unresolved = []
    for entry in entries:
        ended = _ended(manifest["folder"], entry["job_id"])
        if ended:
            states[entry["job_id"]] = ended
        else:
            unresolved.append(entry["job_id"])
    if unresolved and manifest["cluster"] == "slurm":
        from submitit.slurm.slurm import SlurmInfoWatcher

        watcher = SlurmInfoWatcher()  # a fresh one: submitit's shared watcher keeps states sacct no longer lists
        for job_id in unresolved:
            watcher.register_job(job_id)
        watcher.update()
        for job_id in unresolved:
            states[job_id] = (watcher.get_state(job_id, mode="cache") or "UNKNOWN").split()[0]
        unsure = [job_id for job_id in unresolved if states[job_id] in ASK_SQUEUE]
        if unsure:  # sacct lags about a second behind slurmctld and lacks some jobs entirely
            held = _squeue_states(unsure)
            for job_id in unsure:
                ended = "LOST" if states[job_id] == "UNKNOWN" else states[job_id]  # PREEMPTED and not requeued
                states[job_id] = held.get(job_id, ended).split()[0]
    elif unresolved:  # local: the job's process id
        for job_id in unresolved:
            if job_id.isdigit() and _runs(int(job_id), b"submitit"):
                states[job_id] = "RUNNING"
            else:  # gone: its result may have landed since it was read above, and this state is final
                states[job_id] = _ended(manifest["folder"], job_id) or "LOST"
    return states


def _refresh_states(manifest):
    """Update every submitted point's status in ``manifest``.

    A local point's state is final once its process ended: a later job may get its process id again. A
    local point ``QUEUED`` for its turn is pending while the process running the sweep lives, else it was
    never submitted (a failure: ``--resubmit-failed`` runs it).
    """
    local = manifest["cluster"] == "local"
    entries = [e for e in manifest["points"]
               if e["job_id"] and e["status"] != QUEUED and not (local and e["status"] not in ACTIVE)]
    states = _states(manifest, entries) if entries else {}
    for entry in entries:
        entry["status"] = states[entry["job_id"]]
    driver = manifest.get("driver")
    driving = driver is not None and (driver == os.getpid() or _runs(driver, b"slurm.sweep"))
    for entry in manifest["points"]:
        if entry["status"] == QUEUED and not driving:  # the process that was to run it ended first
            entry["status"] = "NOT SUBMITTED"


def _refresh(path):
    """Load the manifest at ``path``, refresh every point's status and result rows, save it; returns it.
    The caller holds the sweep's lock."""
    path, manifest = load(path)
    _refresh_states(manifest)
    for entry in manifest["points"]:
        entry["rows"] = _rows(entry["run_dir"])
    save(path, manifest)
    return manifest


def status(path):
    """Refresh and save every point's status and result rows (under the sweep's lock); returns
    ``(manifest path, manifest)``."""
    path = _manifest_path(path)
    with _locked(path):
        return path, _refresh(path)


def failed(manifest):
    """The points whose job ended without success (or were never submitted)."""
    return [e for e in manifest["points"] if e["status"] not in ACTIVE | {"COMPLETED"}]


def summary(path, manifest):
    """The status table: one line per point, then counts and the failed points."""
    points = manifest["points"]
    width = max(len("point"), *(len(e["name"]) for e in points))
    job_width = max(len("job"), *(len(e["job_id"] or "-") for e in points))
    lines = [f"sweep {manifest['sweep_dir']} ({manifest['cluster']}): {len(points)} points",
             f"{'point':<{width}}  {'job':<{job_width}}  {'state':<13}  {'rows':>5}  run directory"]
    for e in points:
        lines.append(f"{e['name']:<{width}}  {e['job_id'] or '-':<{job_width}}  {e['status']:<13}  {e['rows']:>5}  "
                     f"{e['run_dir']}")
    done = sum(e["status"] == "COMPLETED" for e in points)
    bad = failed(manifest)
    lines.append(f"{done} completed, {len(points) - done - len(bad)} pending or running, {len(bad)} failed")
    if bad:
        lines.append("failed: " + ", ".join(f"{e['name']} (job {e['job_id']} {e['status']})" for e in bad))
        lines.append(f"logs: {manifest['folder']}/<job>_0_log.err; resubmit only these with: "
                     f"{PROG} --resubmit-failed {path}")
    return "\n".join(lines)


def wait(path, poll_s=POLL_S):
    """Block until no point is pending or running (tqdm bar); returns ``(manifest path, manifest)``."""
    from tqdm import tqdm

    path, manifest = status(path)
    total = len(manifest["points"])
    with tqdm(total=total, desc="sweep", unit="job", file=sys.stderr) as bar:
        while True:
            ended = sum(e["status"] not in ACTIVE for e in manifest["points"])
            bar.update(ended - bar.n)
            bar.set_postfix(failed=len(failed(manifest)), refresh=False)
            if ended == total:
                break
            time.sleep(poll_s)
            path, manifest = status(path)
    return path, manifest


def resubmit_failed(path):
    """Resubmit only the failed points (one array; each resumes from its run directory); returns them.

    On SLURM the refresh, the submission and the save of the new job ids are one step under the sweep's
    lock; local points run here to their end, the lock taken only to save.
    """
    path = _manifest_path(path)
    with _locked(path):
        manifest = _refresh(path)
        bad = failed(manifest)
        parameters = manifest["parameters"]
        if bad and manifest["cluster"] == "slurm":
            check_request(parameters)
            _submit_entries(manifest, make_executor(manifest["folder"], parameters), bad)
            save(path, manifest)
    if bad and manifest["cluster"] == "local":
        check_local_request(parameters)
        executor = make_executor(manifest["folder"], parameters, local=True)
        _run_locally(path, manifest, executor, bad, parameters.get("slurm_array_parallelism") or 1)
    return bad


# --- the command ----------------------------------------------------------------------------------------


def main(argv=None):
    """The CLI (see the module docstring); returns the manifest path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=", 1)[0] in ("--status", "--resubmit-failed") for a in argv):
        args = _manage_parser().parse_args(argv)
        path = args.status or args.resubmit_failed
        with exit_on_error(PROG):
            if args.resubmit_failed:
                again = resubmit_failed(path)
                print(f"resubmitted {len(again)} failed point(s)" + "".join(
                    f"\n  {e['name']}: job {e['job_id']}" for e in again))
            path, manifest = wait(path) if args.wait else status(path)
    else:
        args = build_parser().parse_args(argv)
        with exit_on_error(PROG):
            path = submit(argv)
            if not args.local:
                _, manifest = load(path)
                print(f"submitted {len(manifest['points'])} points as job array "
                      f"{manifest['points'][0]['job_id'].split('_')[0]}; manifest {path}", flush=True)
            path, manifest = wait(path) if args.wait else status(path)
    print(summary(path, manifest))
    sys.stdout.flush()
    ran_to_the_end = args.wait or getattr(args, "local", False) or (
        getattr(args, "resubmit_failed", None) and manifest["cluster"] == "local")  # local points run to their end
    if ran_to_the_end and failed(manifest):
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    main()
