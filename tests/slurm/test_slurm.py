"""slurm/: one job, a sweep as one job array, requeue with exact resume, several tasks, refusals before submission.

The cluster tests run on a real SLURM (``.ci/slurm_up.sh``: one node, 2 CPUs, 2 fake GPUs, accounting)
and are skipped when there is none, unless ``SMAT_BENCH_REQUIRE_SLURM=1`` (as in CI), where that is a
failure. Every job runs the embedded mini benchmark; all share the session's ``SMAT_BENCH_CACHE``.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch
from conftest import planted_pickle

from registry.errors import DataError
from slurm import cluster as slurm_cluster
from slurm import launch, sweep
from slurm.cluster import check_request, executor_parameters, make_executor
from slurm.job import BenchmarkJob

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("seconds", "peak_memory_mib")
SMOKE_SMAT = ["--gin", "methods/smat.gin", "--smoke"]
# One and two processes draw other gate noise; at the official mask lr (1e6) a single step sets log α by the sign of
# that noisy gradient, so the two models would differ by far more than the one query per episode the test allows.
CALM_MASKS = ["--bind", "smat.mask_lr = 1.0"]
ONE_CPU = ["--cpus-per-task", "1"]  # the CI node has 2 CPUs: two jobs at a time
RESUME = ["--gin", "methods/smat.gin", "--bind", "run.train_episodes = 48", "--bind", "run.checkpoint_every = 2",
          "--bind", "run.valid_every = 3", "--bind", "run.test_episodes = 2"]  # 12 meta-updates of 4 tasks


def rows(run_dir):
    path = Path(run_dir) / "episodes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def strip(run_rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run_rows]


def cli(module, *args, timeout=300):
    """``python -m MODULE ARGS`` in a subprocess (a hung wait fails the test instead of hanging it)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# --- the cluster ----------------------------------------------------------------------------------------


def _cluster_problem():
    if shutil.which("sbatch") is None:
        return "no SLURM here (sbatch not found); start one with `bash .ci/slurm_up.sh`"
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if state.returncode != 0 or not set(state.stdout.split()) & {"idle", "mix", "alloc"}:
        return f"SLURM is installed but no node is up (sinfo: {(state.stdout + state.stderr).strip()!r})"
    return None


@pytest.fixture(scope="module")
def cluster(bench_cache):
    """A running SLURM with the mini benchmark and its pre-trained backbone already in the shared cache."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("SMAT_BENCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"SMAT_BENCH_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    import gin

    from benchmark.run import build, parse_config

    build(parse_config(["methods/pre.gin"], []))  # generate md_mini and pre-train its ViT once, not in every job
    gin.clear_config()
    return os.environ["SMAT_BENCH_CACHE"]


def all_job_ids():
    result = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-o", "JobID", "-S", "2000-01-01"],
                            capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def sacct_state(job):
    deadline = time.time() + 30
    while time.time() < deadline:  # sacct lags the job by about a second
        state = job.get_info(mode="force").get("State", "UNKNOWN")
        if state not in ("UNKNOWN", "PENDING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    return state


@pytest.fixture(scope="module")
def single_smat(cluster, tmp_path_factory):
    """One smoke SMAT job on one task: the reference of the several-task test too."""
    out = tmp_path_factory.mktemp("single") / "run"
    job = launch.main([*SMOKE_SMAT, *CALM_MASKS, *ONE_CPU, "--out", str(out)])
    assert job.result() == str(out)
    return job, out


def sacct_says(monkeypatch, state):
    """sacct's view (submitit's ``SlurmInfoWatcher``): every job is in ``state``."""
    import submitit.slurm.slurm

    class Watcher:
        def register_job(self, job_id):
            pass

        def update(self):
            pass

        def get_state(self, job_id, mode):
            return state

    monkeypatch.setattr(submitit.slurm.slurm, "SlurmInfoWatcher", Watcher)


def squeue_says(monkeypatch, returncode, stdout="", stderr=""):
    """``squeue`` exits with ``returncode`` and prints ``stdout`` / ``stderr``."""
    def run(command, **kwargs):
        assert command[0] == "squeue", command
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)

    monkeypatch.setattr(sweep.subprocess, "run", run)


def manifest_point(tmp_path, name, job_id, state):
    """Point ``name`` of a sweep in ``tmp_path``, as `sweep.submit` writes it; its job is ``job_id`` (None: not yet)."""
    run_dir = str(tmp_path / name)
    return dict(name=name, values={}, run_dir=run_dir, argv=["--out", run_dir], job_id=job_id,
                jobs=[job_id] if job_id else [], status=state, rows=0)


def manifest_of(tmp_path, cluster, points):
    """The manifest of a sweep in ``tmp_path`` of ``points``, as `sweep.submit` writes it."""
    return dict(format=sweep.FORMAT, sweep_dir=str(tmp_path), cluster=cluster, folder=str(tmp_path / "submitit"),
                parameters={}, workdir=str(tmp_path), points=points)


def slurm_manifest(tmp_path, job_id, state):
    """A saved SLURM sweep of one point ``a`` whose job is ``job_id``; returns the manifest's path."""
    path = tmp_path / sweep.MANIFEST
    sweep.save(path, manifest_of(tmp_path, "slurm", [manifest_point(tmp_path, "a", job_id, state)]))
    return path


# --- no cluster needed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus_here", [0, 1])
def test_a_local_run_asks_for_no_more_gpus_than_the_machine_has(tmp_path, monkeypatch, capsys, gpus_here):
    """On a machine with one GPU, two tasks on two GPUs are refused (rank 1 has no GPU and rank 0 would wait for
    it); on a machine without CUDA they run on the CPU."""
    class Submitted(Exception):
        pass

    def make_executor(folder, parameters, local=False):
        raise Submitted

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_here)
    for module in (launch, sweep):
        monkeypatch.setattr(module, "make_executor", make_executor)
    for main, extra in ((launch.main, []), (sweep.main, ["--grid", "smat.num_experts=[4, 8]"])):
        argv = [*SMOKE_SMAT, *extra, "--local", "--gpus-per-node", "2", "--out", str(tmp_path / main.__module__)]
        if gpus_here:
            with pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 2
            assert "--gpus-per-node 2 --local: this machine has 1 GPU(s); ask for at most 1" in capsys.readouterr().err
        else:
            with pytest.raises(Submitted):
                main(argv)


def test_local_launch_runs_the_job_on_this_machine_without_a_cluster(tmp_path, mini_root, capsys):
    out = tmp_path / "run"
    job = launch.main(["--gin", "methods/pre.gin", "--smoke", "--out", str(out), "--local", "--wait"])
    printed = capsys.readouterr().out
    assert isinstance(job, submitit.LocalJob) and f"run directory: {out}" in printed and "done" in printed
    assert len(rows(out)) == 6 * 2 and all(r["smoke"] for r in rows(out))
    assert Path(job.paths.stdout).parent == out / "submitit"


def test_a_failed_local_job_names_its_exception_and_a_local_resubmission_reports_failure(tmp_path, mini_root, capsys):
    cuda = ["--gin", "methods/pre.gin", "--smoke", "--bind", "run.device = 'cuda:7'", "--local"]  # no such GPU here
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*cuda, "--out", str(tmp_path / "run"), "--wait"])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if " failed: " in line]
    assert exit_info.value.code == 1 and "Error" in line and "_log." not in line, line  # the exception, not a log path
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*cuda, "--grid", "run.seed=[0]", "--out", str(tmp_path / "sweep")])
    assert exit_info.value.code == 1
    with pytest.raises(SystemExit) as exit_info:  # run here again, and failed again
        sweep.main(["--resubmit-failed", str(tmp_path / "sweep" / sweep.MANIFEST)])
    assert exit_info.value.code == 1


def test_a_preempted_job_is_active_while_requeued_and_failed_once_it_is_not(tmp_path, monkeypatch):
    """sacct says PREEMPTED both for a job submitit requeued and one preemption cancelled: squeue decides."""
    sacct_says(monkeypatch, "PREEMPTED")
    monkeypatch.setattr(sweep, "_squeue_states", lambda job_ids: {"11": "PENDING"})  # job 11 was requeued
    manifest = {"folder": str(tmp_path), "cluster": "slurm",
                "points": [{"job_id": "11", "status": None}, {"job_id": "12", "status": None}]}
    states = sweep._states(manifest, manifest["points"])
    assert states == {"11": "PENDING", "12": "PREEMPTED"}
    for entry in manifest["points"]:
        entry["status"] = states[entry["job_id"]]
    assert [e["job_id"] for e in sweep.failed(manifest)] == ["12"]


def test_a_failing_squeue_is_an_error_and_only_a_job_it_does_not_know_is_lost(tmp_path, monkeypatch):
    """squeue decides for a job sacct does not know. Asked for one id slurmctld does not know, squeue exits 1
    with "Invalid job id specified" (see the cluster test): lost. Any other failure leaves the states unknown."""
    sacct_says(monkeypatch, "UNKNOWN")
    manifest = {"folder": str(tmp_path), "cluster": "slurm", "points": [{"job_id": "11", "status": "RUNNING"}]}
    squeue_says(monkeypatch, 0, stdout="11|RUNNING\n")
    assert sweep._states(manifest, manifest["points"]) == {"11": "RUNNING"}
    squeue_says(monkeypatch, 1, stderr="slurm_load_jobs error: Invalid job id specified\n")
    assert sweep._states(manifest, manifest["points"]) == {"11": "LOST"}
    squeue_says(monkeypatch, 1, stderr="slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n")
    with pytest.raises(DataError, match=r"^squeue failed: .*\(connect failure\); job states unknown, try again$"):
        sweep._states(manifest, manifest["points"])

    def hangs(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(sweep.subprocess, "run", hangs)
    with pytest.raises(DataError, match=r"^squeue failed: .*timed out after 60 seconds; job states unknown"):
        sweep._states(manifest, manifest["points"])


@pytest.mark.skipif(Path("/proc/2/comm").read_text().strip() != "kthreadd" if Path("/proc/2/comm").exists() else True,
                    reason="needs Linux /proc with kthreadd as process 2")
def test_a_local_job_id_that_is_now_a_kernel_thread_is_not_running():
    """A local job's id is its process id; a kernel thread (empty cmdline forever, no exe) that has it is not the job,
    while a process that has no cmdline yet but an exe may be one still exec-ing."""
    assert not sweep._runs(2, b"submitit")
    assert not sweep._runs(os.getpid(), b"submitit")  # a program, but not submitit's


def test_points_a_local_sweep_has_not_started_yet_are_pending_while_it_runs_and_failed_once_it_ended(tmp_path):
    """``--status`` in another terminal during ``--local``: the points waiting for their turn are not failed
    (``--resubmit-failed`` would run them twice), unless the process that was to run them has ended."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "slurm.sweep"])
    try:
        manifest = manifest_of(tmp_path, "local", [manifest_point(tmp_path, "a", None, sweep.QUEUED)])
        sweep.save(tmp_path / sweep.MANIFEST, {**manifest, "driver": driver.pid})
        _, refreshed = sweep.status(tmp_path)
        assert refreshed["points"][0]["status"] == sweep.QUEUED and sweep.failed(refreshed) == []
    finally:
        driver.kill()
        driver.wait()
    _, refreshed = sweep.status(tmp_path)
    assert [e["name"] for e in sweep.failed(refreshed)] == ["a"] and refreshed["points"][0]["status"] == "NOT SUBMITTED"


def test_status_never_writes_back_the_job_ids_a_resubmission_just_saved(tmp_path, monkeypatch):
    """``--status`` asks sacct (slow) while ``--resubmit-failed`` in another terminal resubmits the failed
    point: the new job id stays in the manifest (or a later resubmission would run a second job in its directory)."""
    path = slurm_manifest(tmp_path, "11", "FAILED")
    resubmitted = threading.Event()
    elsewhere = threading.Thread(target=lambda: sweep.resubmit_failed(path) and resubmitted.set())
    asked = []

    def sacct(manifest, entries):
        asked.append(threading.current_thread())
        if len(asked) == 1:  # --status: the resubmission starts while sacct answers (with the lock: it waits)
            elsewhere.start()
            resubmitted.wait(timeout=2)
        return {e["job_id"]: "FAILED" if e["job_id"] == "11" else "PENDING" for e in entries}

    monkeypatch.setattr(sweep, "_states", sacct)
    monkeypatch.setattr(sweep, "check_request", lambda parameters: "debug")
    monkeypatch.setattr(sweep, "make_executor", lambda folder, parameters, local=False: None)
    monkeypatch.setattr(sweep, "submit_jobs", lambda executor, argvs, workdir=None: [SimpleNamespace(job_id="12")])
    sweep.status(path)
    elsewhere.join(timeout=30)
    assert [p["jobs"] for p in sweep.load(path)[1]["points"]] == [["11", "12"]]
    for missing in (tmp_path / "nowhere", tmp_path / "a"):  # no manifest: the error, and no lock file made
        with pytest.raises(DataError, match="no sweep manifest"):
            sweep.status(missing)
        assert not (missing / sweep.LOCK).exists()


def test_a_local_sweep_takes_the_lock_only_to_save_so_status_answers_meanwhile(tmp_path):
    path = tmp_path / sweep.MANIFEST
    manifest = manifest_of(tmp_path, "local", [manifest_point(tmp_path, "a", None, "NOT SUBMITTED")])
    sweep.save(path, manifest)
    answered = []

    class Job:  # a local job still running while --status runs elsewhere
        job_id = "999999999"

        def done(self):
            asker = threading.Thread(target=lambda: answered.append(sweep.status(path)), daemon=True)
            asker.start()
            asker.join(timeout=30)
            return True

    executor = SimpleNamespace(submit=lambda job, argv: Job())
    sweep._run_locally(path, manifest, executor, manifest["points"], 1)
    assert len(answered) == 1 and sweep.load(path)[1]["points"][0]["jobs"] == ["999999999"]


def test_a_local_job_that_gets_an_earlier_jobs_process_id_is_not_taken_for_it(tmp_path):
    """Local job ids are process ids. Point ``a`` ended (its result file is there, its state not yet read);
    point ``b``'s new process gets the same id: ``a`` stays completed, ``b`` is running, not ``a``'s result."""
    import pickle

    folder = tmp_path / "submitit"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    pid = str(process.pid)
    (folder / f"{pid}_0_result.pkl").write_bytes(pickle.dumps(("success", "a's run directory")))

    class Executor:  # the local executor, started a process that got a's id again
        def submit(self, job, argv):
            return type("Job", (), {"job_id": pid})()

    manifest = manifest_of(tmp_path, "local", [manifest_point(tmp_path, "a", pid, "PENDING"),
                                               manifest_point(tmp_path, "b", None, "NOT SUBMITTED")])
    path = tmp_path / sweep.MANIFEST
    try:
        sweep._submit_entries(manifest, Executor(), manifest["points"][1:])
        sweep.save(path, manifest)
        _, manifest = sweep.status(path)
        assert [e["status"] for e in manifest["points"]] == ["COMPLETED", "RUNNING"]
    finally:
        process.kill()
        process.wait()
    (folder / f"{pid}_0_result.pkl").write_bytes(pickle.dumps(("error", "Traceback: b failed")))
    _, manifest = sweep.status(path)
    assert [e["status"] for e in manifest["points"]] == ["COMPLETED", "FAILED"]


def test_a_process_that_got_a_local_jobs_id_later_is_not_the_job(tmp_path):
    """A point whose process is gone, its id now held by another program (here: this test), is lost."""
    manifest = dict(cluster="local", folder=str(tmp_path), points=[{"job_id": str(os.getpid()), "status": "RUNNING"}])
    assert sweep._states(manifest, manifest["points"]) == {str(os.getpid()): "LOST"}


def _edited(path, edit):
    """Rewrite the manifest at ``path`` as ``edit(its JSON)`` returns it."""
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return path


def _point(manifest, **changes):
    manifest["points"][0].update(changes)
    return manifest


BAD_SHAPES = {
    "list": lambda m: [m],
    "no_format": lambda m: {k: v for k, v in m.items() if k != "format"},
    "no_points": lambda m: {k: v for k, v in m.items() if k != "points"},
    "points_not_a_list": lambda m: {**m, "points": {"a": m["points"][0]}},
    "no_points_at_all": lambda m: {**m, "points": []},
    "point_not_an_object": lambda m: {**m, "points": ["a"]},
    "folder_not_a_string": lambda m: {**m, "folder": ["submitit"]},
    "unknown_cluster": lambda m: {**m, "cluster": "lsf"},
    "point_without_status": lambda m: {**m, "points": [{k: v for k, v in m["points"][0].items() if k != "status"}]},
    "job_id_a_number": lambda m: _point(m, job_id=11),
    "rows_a_string": lambda m: _point(m, rows="3"),
    "job_id_a_path": lambda m: _point(m, job_id="../../elsewhere/11"),
    "argv_without_out": lambda m: _point(m, argv=["--gin", "methods/pre.gin"]),
}


@pytest.mark.parametrize("command", ["--status", "--wait", "--resubmit-failed"])
@pytest.mark.parametrize("edit", BAD_SHAPES.values(), ids=BAD_SHAPES)
def test_a_manifest_of_the_wrong_shape_is_one_error_line_and_left_as_it_is(tmp_path, capsys, command, edit):
    path = _edited(slurm_manifest(tmp_path, "11", "FAILED"), edit)
    before = path.read_bytes()
    args = ["--status", str(tmp_path), "--wait"] if command == "--wait" else [command, str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        sweep.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m slurm.sweep: error: {path}: ") and "submit the sweep again" in err
    assert path.read_bytes() == before


@pytest.mark.parametrize("key", ["folder", "run_dir", "sweep_dir"])
def test_a_manifest_pointing_outside_its_sweep_directory_is_refused_and_nothing_there_is_unpickled(tmp_path, capsys,
                                                                                                   key):
    """A sweep.json whose folder (or run or sweep directory) is elsewhere: --status would unpickle the result files
    there, which run code. The job's result file there is a planted pickle; it is never loaded."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "submitit").mkdir(parents=True)
    (elsewhere / "submitit" / "11_0_result.pkl").write_bytes(planted_pickle(tmp_path / "planted"))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    moved = {"folder": lambda m: {**m, "folder": str(elsewhere / "submitit")},
             "run_dir": lambda m: _point(m, run_dir=str(elsewhere / "a"), argv=["--out", str(elsewhere / "a")]),
             "sweep_dir": lambda m: {**m, "sweep_dir": str(elsewhere)}}[key]
    path = _edited(slurm_manifest(sweep_dir, "11", "FAILED"), moved)
    if key != "folder":  # the planted result where the job's real one would be
        (sweep_dir / "submitit").mkdir()
        (sweep_dir / "submitit" / "11_0_result.pkl").write_bytes(planted_pickle(tmp_path / "planted"))
    for command in ("--status", "--resubmit-failed"):
        with pytest.raises(SystemExit) as exit_:
            sweep.main([command, str(sweep_dir)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"{path}: {key if key != 'run_dir' else 'points[0].run_dir'} {elsewhere}" in err
        assert f"is not the sweep directory {sweep_dir} (the one holding sweep.json) or inside it" in err
    assert not (tmp_path / "planted").exists()


def test_a_manifest_reached_through_a_link_to_its_directory_is_its_own(tmp_path):
    """Paths are compared once resolved: a sweep followed through a symlinked directory is still inside."""
    (tmp_path / "real").mkdir()
    path = slurm_manifest(tmp_path / "real", None, "NOT SUBMITTED")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert sweep.load(tmp_path / "link")[1] == sweep.load(path)[1]


def test_checkpoint_requeues_a_fresh_job_with_the_same_command_and_directory(tmp_path):
    argv = ["--gin", "methods/smat.gin", "--out", "/runs/x"]
    job = BenchmarkJob(tmp_path)
    delayed = job.checkpoint(argv)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, BenchmarkJob) and delayed.function is not job and delayed.args == (argv,)
    assert delayed.function.workdir == str(tmp_path)


def test_a_job_pickled_before_jobs_had_a_directory_runs_where_it_starts_and_requeues():
    old = BenchmarkJob.__new__(BenchmarkJob)  # what unpickling such a job gives: no workdir of its own
    assert isinstance(old.checkpoint(["--gin", "x.gin"]).function, BenchmarkJob)
    with pytest.raises(DataError, match="gin file methods/nope.gin: not found"):
        old(["--gin", "methods/nope.gin"])


def test_failed_points_resubmitted_from_elsewhere_run_where_the_sweep_was_submitted(tmp_path, mini_root, monkeypatch):
    """A point failed (here: a GPU this machine lacks), the user's own gin file (relative to where the sweep
    was submitted) is fixed, and the points are resubmitted from another directory: they find the file."""
    submitted_from, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    submitted_from.mkdir(), elsewhere.mkdir()
    mine = submitted_from / "mine.gin"
    mine.write_text("include 'methods/pre.gin'\nrun.device = 'cuda:7'\n")
    monkeypatch.chdir(submitted_from)
    with pytest.raises(SystemExit):
        sweep.main(["--gin", "mine.gin", "--smoke", "--grid", "run.seed=[0]", "--local", "--out", str(tmp_path / "s")])
    mine.write_text("include 'methods/pre.gin'\nrun.device = 'cpu'\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the job unpickles slurm.job here, installed or not
    sweep.main(["--resubmit-failed", str(tmp_path / "s")])
    assert len(rows(tmp_path / "s" / "seed=0")) == 6 * 2


def test_a_slurm_job_exports_the_environment_of_its_submission_not_of_the_saved_parameters(tmp_path, monkeypatch):
    """A sweep's saved parameters carry no ``export``: a resubmission exports SMAT_BENCH_RECORDS as set then,
    after the user's setup lines and after the stale export an older manifest saved (the later export wins)."""
    monkeypatch.setenv("SMAT_BENCH_RECORDS", "/old/records")
    assert "slurm_setup" not in executor_parameters()
    monkeypatch.setenv("SMAT_BENCH_RECORDS", "/fixed records")
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: f"/usr/bin/{name}")  # a submit host
    saved = executor_parameters(slurm_setup=["module load cuda", "export SMAT_BENCH_RECORDS=/old/records"])
    setup = make_executor(tmp_path, saved)._executor.parameters["setup"]
    assert setup[:2] == saved["slurm_setup"] and setup[-1] == "export SMAT_BENCH_RECORDS='/fixed records'"
    with pytest.raises(DataError, match="--slurm setup='module load cuda': expected a list of shell lines"):
        make_executor(tmp_path, executor_parameters(slurm_setup="module load cuda"))


def test_a_request_needs_one_node_with_both_its_gpus_and_its_cpus(monkeypatch):
    nodes = {"g1": dict(cpus=16, gpus=8, gres="gpu:8"), "c1": dict(cpus=128, gpus=0, gres="(null)")}
    monkeypatch.setattr(slurm_cluster, "partitions", lambda: {"mixed": dict(default=True, nodes=nodes)})
    assert check_request(executor_parameters(gpus_per_node=8, cpus_per_task=2)) == "mixed"  # 16 CPUs: g1
    assert check_request(executor_parameters(cpus_per_task=128)) == "mixed"  # c1
    with pytest.raises(DataError, match=re.escape(
            "8 GPUs and 64 CPUs on one node (--gpus-per-node; --cpus-per-task × tasks per node): partition mixed has "
            "no node with both (c1: 128 CPUs, 0 GPUs, g1: 16 CPUs, 8 GPUs); lower --cpus-per-task or --gpus-per-node "
            "(its nodes with 8 or more GPUs have at most 16 CPUs), or choose another --partition")):
        check_request(executor_parameters(gpus_per_node=8, cpus_per_task=8))
    with pytest.raises(DataError, match="no node with both .*; ask for at most 8 GPUs, or choose another --partition"):
        check_request(executor_parameters(gpus_per_node=9))
    with pytest.raises(DataError, match=r"no node with both .*; lower --cpus-per-task \(its nodes have at most 128 "):
        check_request(executor_parameters(cpus_per_task=129))


def test_cluster_defaults_come_first_and_the_callers_options_last():
    defaults = executor_parameters()
    assert defaults["slurm_signal_delay_s"] == 120 and defaults["slurm_max_num_timeout"] == 30
    assert defaults["tasks_per_node"] == 1 and "gpus_per_node" not in defaults  # never --gpus-per-node=0
    gpus = executor_parameters(gpus_per_node=2, timeout_min=7, slurm_signal_delay_s=30)
    assert (gpus["tasks_per_node"], gpus["gpus_per_node"], gpus["timeout_min"], gpus["slurm_signal_delay_s"]) == (
        2, 2, 7, 30)
    assert executor_parameters(gpus_per_node=2, tasks_per_node=1)["tasks_per_node"] == 1


def test_generic_options_stay_generic_and_free_options_are_prefixed():
    args = launch.build_parser().parse_args([
        "--gin", "methods/smat.gin", "--partition", "p", "--gpus-per-node", "2", "--cpus-per-task", "3",
        "--mem-gb", "16", "--timeout-min", "90", "--account", "a", "--qos", "q", "--constraint", "c",
        "--slurm", "exclusive=True", "--slurm", "comment=smat run", "--slurm", "signal_delay_s=60"])
    params = launch.parameters_from_args(args)
    assert params["slurm_partition"] == "p" and params["slurm_account"] == "a" and params["slurm_qos"] == "q"
    assert params["slurm_constraint"] == "c" and params["slurm_exclusive"] is True
    assert params["slurm_comment"] == "smat run" and params["slurm_signal_delay_s"] == 60  # --slurm is applied last
    assert (params["gpus_per_node"], params["tasks_per_node"], params["cpus_per_task"], params["mem_gb"],
            params["timeout_min"]) == (2, 2, 3, 16, 90)
    make_executor("unused", params, local=True)  # submitit accepts every name


def test_an_unknown_slurm_option_is_refused_with_submitits_list():
    with pytest.raises(DataError, match="Unknown argument 'bogus'.*Valid arguments:.*partition"):
        make_executor("unused", executor_parameters(slurm_bogus=1), local=True)


def test_every_run_option_passes_through_to_the_job_unchanged():
    argv = ["--gin", "a.gin", "--partition", "debug", "--bind", "x.y = -1", "--stage", "eval", "--smoke",
            "--checkpoint", "c.pt", "--adapt", "protonet,full", "--slurm", "qos=high", "--out", "r", "--local"]
    assert launch.run_argv(argv, launch.cluster_parser()) == [
        "--gin", "a.gin", "--bind", "x.y = -1", "--stage", "eval", "--smoke", "--checkpoint", "c.pt",
        "--adapt", "protonet,full"]


def test_each_grid_point_is_checked_as_its_job_runs_and_a_grid_an_option_overrides_is_refused(tmp_path, monkeypatch):
    """--adapt binds run.adapters after the point's --bind, in the job as in the check: a grid of adapters
    with --adapt would run protonet at every point."""
    class Submitted(Exception):
        pass

    def check_request(parameters):
        raise Submitted

    monkeypatch.setattr(sweep, "check_request", check_request)
    smat = ["--gin", "methods/smat.gin", "--adapt", "protonet", "--out", str(tmp_path / "s")]
    with pytest.raises(DataError, match=r"^grid points adapters=\S+ and adapters=\S+ run the same config: an option "
                                        r"\(--adapt, --smoke, --bind\) overrides what the grid varies"):
        sweep.submit([*smat, "--grid", "run.adapters=[('full',), ('lora',)]"])
    with pytest.raises(Submitted):  # what --adapt does not override is a sweep
        sweep.submit([*smat, "--grid", "smat.num_experts=[4, 8]", "--grid", "gin=[methods/pmf.gin, methods/smat.gin]"])
    assert not (tmp_path / "s").exists()


def test_grid_points_are_the_cartesian_product_with_readable_names():
    grid = sweep.parse_grid(["smat.target_sparsity=[0.5, 0.7]", "smat.num_experts=[4, 8, 16]",
                             "gin=[methods/pmf.gin, methods/smat.gin]"])
    points = sweep.points_of(grid)
    assert len(points) == 12 and points[0] == {"smat.target_sparsity": 0.5, "smat.num_experts": 4,
                                               "gin": "methods/pmf.gin"}
    assert sweep.point_name(points[0], grid) == "target_sparsity=0.5,num_experts=4,gin=pmf"
    assert len({sweep.point_name(p, grid) for p in points}) == 12
    clash = sweep.parse_grid(["pmf.lr=[0.1]", "smat.lr=[0.2]"])
    assert sweep.point_name(sweep.points_of(clash)[0], clash) == "pmf.lr=0.1,smat.lr=0.2"
    for bad in ["smat.num_experts", "smat.num_experts=4", "smat.num_experts=[]", "x=[1, 1]"]:
        with pytest.raises(DataError, match="--grid"):
            sweep.parse_grid([bad])


# --- on the cluster -------------------------------------------------------------------------------------


def test_one_job_runs_on_the_cluster_and_writes_its_results(single_smat):
    job, out = single_smat
    written = rows(out)
    assert len(written) == 6 * 2 and all(r["smoke"] and r["method"] == "smat" for r in written)
    assert sacct_state(job) == "COMPLETED"
    assert Path(job.paths.stdout).exists() and (out / "submitit").is_dir()


def test_bad_requests_are_refused_before_anything_is_submitted(cluster, tmp_path, capsys):
    before = all_job_ids()
    cases = [
        (launch.main, [*SMOKE_SMAT, "--partition", "nope"], "--partition nope: no such partition"),
        (launch.main, [*SMOKE_SMAT, "--gpus-per-node", "3", *ONE_CPU], "3 GPUs and 3 CPUs on one node"),
        (launch.main, [*SMOKE_SMAT, "--bind", "smat.num_expert = 4"], "doesn't have a parameter named 'num_expert'"),
        (sweep.main, [*SMOKE_SMAT, "--grid", "smat.num_expert=[4, 8]"], "doesn't have a parameter named 'num_expert'"),
        (sweep.main, [*SMOKE_SMAT, "--grid", "smat.num_experts=[4, 8]", "--partition", "nope"], "no such partition"),
        (sweep.main, [*SMOKE_SMAT, "--grid", "smat.num_experts=[4, 8]", "--gpus-per-node", "9"], "ask for at most 2 GPUs"),
        (launch.main, [*SMOKE_SMAT, "--adapt", "bogus"], "--adapt bogus: unknown adapter"),
        (sweep.main, [*SMOKE_SMAT, "--grid", "smat.num_experts=[4, 8]", "--adapt", "bogus"], "unknown adapter"),
    ]
    for i, (main, argv, message) in enumerate(cases):
        out = tmp_path / f"case{i}"
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("python -m slurm.") and message in err[-1], err
        assert not out.exists()
    time.sleep(1)
    assert all_job_ids() == before


def test_squeue_leaves_out_the_jobs_it_does_not_know(cluster):
    """Asked for one id slurmctld does not know, squeue exits 1 ("Invalid job id specified"); for several, 0."""
    assert sweep._squeue_states(["999999"]) == {} and sweep._squeue_states(["999998", "999999_3"]) == {}


def test_a_sweep_is_one_array_with_a_manifest_and_only_failed_points_are_resubmitted(cluster, tmp_path, capsys):
    """2 × 2 grid as one array; cancel one element; --status --wait names it; --resubmit-failed runs only it."""
    sweep_dir = tmp_path / "sweep"
    manifest_path = sweep.main([*SMOKE_SMAT, *ONE_CPU, "--grid", "smat.target_sparsity=[0.5, 0.9]",
                                "--grid", "smat.num_experts=[2, 4]", "--array-parallelism", "2",
                                "--out", str(sweep_dir)])
    manifest = json.loads(manifest_path.read_text())
    ids = [p["job_id"] for p in manifest["points"]]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(4)], ids  # one job array
    capsys.readouterr()
    subprocess.run(["scancel", ids[3]], check=True)  # the last point never gets to run

    waited = cli("slurm.sweep", "--status", str(manifest_path), "--wait")
    last = "target_sparsity=0.9,num_experts=4"
    assert waited.returncode == 1, waited.stderr  # --wait: 1 when a point failed
    assert "3 completed, 0 pending or running, 1 failed" in waited.stdout and "sweep: 100%" in waited.stderr
    # a pending array element that is cancelled leaves no accounting record: LOST, unless sacct saw it
    assert re.search(rf"failed: {re.escape(last)} \(job {ids[3]} (CANCELLED|LOST)\)", waited.stdout), waited.stdout
    assert f"--resubmit-failed {manifest_path}" in waited.stdout

    again = cli("slurm.sweep", "--resubmit-failed", str(sweep_dir), "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resubmitted 1 failed point(s)" in again.stdout
    assert "4 completed, 0 pending or running, 0 failed" in again.stdout
    manifest = json.loads(manifest_path.read_text())
    for point, old in zip(manifest["points"], ids):
        assert point["status"] == "COMPLETED" and point["rows"] == 12 and len(rows(point["run_dir"])) == 12
        assert Path(point["run_dir"]).parent == sweep_dir and Path(point["run_dir"]).name == point["name"]
        assert point["jobs"][0] == old and (len(point["jobs"]) == 2) == (old == ids[3])
    assert [p["name"] for p in manifest["points"]] == [
        "target_sparsity=0.5,num_experts=2", "target_sparsity=0.5,num_experts=4",
        "target_sparsity=0.9,num_experts=2", last]
    configs = {p["name"]: (Path(p["run_dir"]) / "config.gin").read_text() for p in manifest["points"]}
    assert "smat.num_experts = 4" in configs[last] and "smat.target_sparsity = 0.9" in configs[last]

    sweep.main(["--status", str(manifest_path)])
    table = capsys.readouterr().out
    assert table.count("COMPLETED") == 4 and all(p["name"] in table for p in manifest["points"])


def test_a_preempted_job_requeues_and_resumes_to_the_uninterrupted_result(cluster, tmp_path, capsys):
    whole = launch.main([*RESUME, *ONE_CPU, "--out", str(tmp_path / "whole")])
    interrupted = launch.main([*RESUME, *ONE_CPU, "--out", str(tmp_path / "interrupted")])
    last = tmp_path / "interrupted" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not interrupted.done():
        if last.exists() and torch.load(last, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.2)
    assert not interrupted.done(), "the job ended before it could be interrupted"
    subprocess.run(["scancel", "--signal=USR2", interrupted.job_id], check=True)  # SLURM's warning / preemption
    signalled_at = torch.load(last, weights_only=True)["step"]

    assert interrupted.result() == str(tmp_path / "interrupted") and whole.result() == str(tmp_path / "whole")
    log = Path(interrupted.paths.stderr).read_text() + Path(interrupted.paths.stdout).read_text()
    assert f"Requeued job {interrupted.job_id}" in log and re.search(r"resuming .* at meta-update \d+/12", log)
    assert signalled_at < 12
    assert strip(rows(tmp_path / "interrupted")) == strip(rows(tmp_path / "whole")) and len(rows(tmp_path / "whole")) == 12
    a = torch.load(last, weights_only=True)
    b = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for name, tensor in b["model"].items():
        assert torch.equal(tensor, a["model"][name]), name
    steps = [json.loads(line)["step"] for line in (last.parent.parent / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_two_tasks_on_the_fake_gpus_give_the_single_task_results(single_smat, tmp_path, capsys):
    """--gpus-per-node 2: two processes (gloo on this CPU node) share each meta-update and the episodes."""
    _, single = single_smat
    out = tmp_path / "two"
    job = launch.main([*SMOKE_SMAT, *CALM_MASKS, *ONE_CPU, "--gpus-per-node", "2", "--out", str(out)])
    assert "2 tasks, 2 GPUs" in capsys.readouterr().out
    assert job.results() == [str(out), str(out)]
    for rank in (0, 1):
        assert f"global_rank={rank}(2)" in Path(job.paths.stderr).with_name(f"{job.job_id}_{rank}_log.err").read_text()
    one, two = strip(rows(single)), strip(rows(out))
    key = lambda r: (r["adaptation"], r["source"], r["episode"])  # noqa: E731
    assert sorted(map(key, two)) == sorted(map(key, one)) and len(set(map(key, two))) == len(two)  # once each
    by_key = {key(r): r for r in one}
    for row in two:
        ref = by_key[key(row)]
        for name in ("config_hash", "ways", "support", "query", "split", "seed", "role"):
            assert row[name] == ref[name], (key(row), name)
        assert row["run_id"] == ref["run_id"] + "-w2"  # a 2-process run is told apart from the 1-process one
        assert abs(row["accuracy"] - ref["accuracy"]) <= 1 / row["query"] + 1e-6, key(row)  # one query at most
    first = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first(out)["step"] == first(single)["step"] == 1
    assert first(out)["loss"] == pytest.approx(first(single)["loss"], rel=1e-5)  # the same 4 tasks, all gathered


# --- the example sbatch files (plain sbatch, no submitit) -----------------------------------------------


def sbatch(*args, env=None):
    """``sbatch ARGS`` from the project's root, its jobs running this interpreter's ``python``; returns the job id
    (with ``--wait``, after the job ended well: sbatch exits with the job's status)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PATH": path, **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def test_the_example_sbatch_file_runs_one_task_per_gpu_in_one_group(single_smat, tmp_path):
    _, single = single_smat
    out, log = tmp_path / "two", tmp_path / "job.out"
    sbatch("--wait", "--gres=gpu:2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",  # the job's exit
           "slurm/examples/benchmark_run.sbatch", *SMOKE_SMAT, *CALM_MASKS, "--out", str(out))  # status is sbatch's
    one, two = rows(single), rows(out)
    key = lambda r: (r["adaptation"], r["source"], r["episode"])  # noqa: E731
    assert sorted(map(key, two)) == sorted(map(key, one)), log.read_text()
    assert {r["run_id"] for r in two} == {one[0]["run_id"] + "-w2"}  # meta-trained by two processes


def test_the_example_sbatch_file_requeues_before_its_time_limit_and_resumes(cluster, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    job_id = sbatch("--gres=gpu:1", "--cpus-per-task=1", f"--output={log}", "slurm/examples/benchmark_run.sbatch",
                    *RESUME, "--out", str(out))
    last, deadline = out / "checkpoints" / "last.pt", time.time() + 300
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)  # SLURM's warning (--signal=B:USR1@120)
    states = []
    while time.time() < deadline and (not states or states[-1] not in ("COMPLETED", "FAILED", "CANCELLED")):
        time.sleep(1)
        states.append(subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-o", "State"], capture_output=True,
                                     text=True).stdout.strip())
    text = log.read_text()
    assert states[-1] == "COMPLETED" and f"requeueing job {job_id}" in text, (states, text[-2000:])
    assert re.search(r"resuming .* at meta-update \d+/12", text)
    assert len(rows(out)) == 12
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_the_table1_example_is_one_array_element_per_method(cluster, tmp_path):
    sbatch("--wait", "--array=0-1", "--gres=gpu:1", "--cpus-per-task=1", f"--output={tmp_path}/%a.out",
           "slurm/examples/table1_array.sbatch", "--smoke", env={"TABLE1_OUT": str(tmp_path)})
    for method in ("pre", "pmf"):
        written = rows(tmp_path / method)
        assert written and {r["method"] for r in written} == {method}, (tmp_path / "0.out").read_text()[-2000:]
