"""``python -m benchmark.run`` (contract C2): every shipped gin file, run directories, checkpoints, exact resume."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmark.run import code_version, main, parse_config
from registry.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
METHOD_GINS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "methods").rglob("*.gin"))
SETUP_GINS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmark" / "setups").glob("md_paper*.gin"))
TIMING = ("seconds", "peak_memory_mib")


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "episodes.jsonl").read_text().splitlines()]


def rewrite_checkpoint(path, state):
    """Replace a run's checkpoint with ``state`` as the run itself would (its SHA-256 recorded in the run)."""
    from benchmark.rundir import replace_checkpoint

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    replace_checkpoint(path.parent.parent, tmp, path)


@pytest.mark.parametrize("gin_file", METHOD_GINS)
def test_every_method_gin_file_runs_as_a_smoke_job_on_the_mini_benchmark(gin_file, tmp_path, mini_root, capsys):
    main(["--gin", gin_file, "--smoke", "--out", str(tmp_path / "run")])
    written = rows(tmp_path / "run")
    assert len(written) == 6 * 2 and all(r["smoke"] is True and r["benchmark"] == "md_mini" for r in written)
    assert all(len(r["episode_digest"]) == 16 for r in written)
    assert (tmp_path / "run" / "config.gin").read_text().count("run.method") == 1
    trained = {written[0]["code_version"]} if "pre.gin" not in gin_file else {None}  # Pre is not trained
    assert {r["trained_code_version"] for r in written} == trained
    assert "ID avg (protonet)" in capsys.readouterr().out


@pytest.mark.parametrize("setup", SETUP_GINS)
@pytest.mark.parametrize("gin_file", METHOD_GINS)
def test_every_paper_setup_combines_with_every_method(setup, gin_file):
    config = parse_config([setup, gin_file], [])
    assert config.benchmark.startswith("md_paper") and config.train_episodes == 50000
    assert config.backbone.startswith("vit_small_patch16_224.")


def test_no_benchmark_bound_runs_the_mini_setup_and_says_so(tmp_path, mini_root, capsys):
    main(["--gin", "methods/pre.gin", "--smoke", "--out", str(tmp_path / "run")])
    assert "running the embedded mini benchmark md_mini" in capsys.readouterr().err


def test_adapt_overrides_the_gin_adapters(tmp_path, mini_root):
    main(["--gin", "methods/smat.gin", "--smoke", "--adapt", "protonet,gradient_free", "--out", str(tmp_path / "r")])
    assert {r["adaptation"] for r in rows(tmp_path / "r")} == {"protonet", "gradient_free"}


def test_a_run_directory_is_never_reused_by_another_config(tmp_path, mini_root):
    main(["--gin", "methods/pre.gin", "--smoke", "--out", str(tmp_path / "run")])
    before = (tmp_path / "run" / "episodes.jsonl").read_text()
    with pytest.raises(DataError, match="holds a run with another operative config"):
        from benchmark.run import build_parser, execute

        execute(build_parser().parse_args(["--gin", "methods/pmf.gin", "--smoke", "--out", str(tmp_path / "run")]))
    assert (tmp_path / "run" / "episodes.jsonl").read_text() == before


def test_a_checkpoint_of_another_method_is_refused(tmp_path, mini_root):
    main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "train", "--out", str(tmp_path / "pmf")])
    with pytest.raises(SystemExit) as exit_info:
        main(["--gin", "methods/softmerge.gin", "--smoke", "--stage", "eval", "--out", str(tmp_path / "sm"),
              "--checkpoint", str(tmp_path / "pmf" / "checkpoints" / "best.pt")])
    assert exit_info.value.code == 2


def test_checkpoints_load_with_weights_only(tmp_path, mini_root):
    main(["--gin", "methods/smat.gin", "--smoke", "--stage", "train", "--out", str(tmp_path / "r")])
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and "lagrange_multipliers" in state["model"] and len(state["training"]["optimizers"]) == 3
    assert state["code_version"] == code_version()
    assert len(state["torch_rng"]) == 1 and state["torch_rng"][0].dtype == torch.uint8


def test_code_version_outside_git_is_the_one_its_copier_named(tmp_path, monkeypatch):
    import benchmark.run

    monkeypatch.setattr(benchmark.run, "PROJECT_ROOT", tmp_path)  # a copy without .git
    monkeypatch.delenv("SMAT_BENCH_CODE_VERSION", raising=False)
    assert code_version().startswith("smat-bench ")  # the installed package's version
    monkeypatch.setenv("SMAT_BENCH_CODE_VERSION", "0123abc")
    assert code_version() == "0123abc"


def test_code_version_is_dirty_with_changed_files_or_an_uncommitted_python_file(tmp_path, monkeypatch):
    """An uncommitted one-file method makes the code another one; run directories and notes do not."""
    import benchmark.run

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "tracked.py").write_text("x = 1\n")
    git("add", "tracked.py")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(benchmark.run, "PROJECT_ROOT", tmp_path)
    clean = code_version()
    (tmp_path / "notes.txt").write_text("not code\n")
    (tmp_path / "myruns" / "a").mkdir(parents=True)
    (tmp_path / "myruns" / "a" / "config.gin").write_text("run.seed = 0\n")
    assert len(clean) == 40 and code_version() == clean
    (tmp_path / "my_method.py").write_text("y = 2\n")
    assert code_version() == clean + "+dirty"
    (tmp_path / "my_method.py").unlink()
    (tmp_path / "tracked.py").write_text("x = 2\n")
    assert code_version() == clean + "+dirty"


def test_pmf_takes_its_8_gpu_recipe_on_the_paper_setup_and_the_mini_setups_own():
    """PMF's README command on 8 GPUs averages 8 episodes per update at lr 5e-4; pmf.gin binds neither, so the
    md_mini setup (parsed first) keeps its one episode per update."""
    import gin

    from methods import MINI_BACKBONE, create_backbone, create_method

    found = {}
    for setup in ("benchmark/setups/md_paper.gin", None):
        parse_config([setup, "methods/pmf.gin"] if setup else ["methods/pmf.gin"], [])
        try:
            pmf = create_method("pmf", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
            found[setup] = pmf.tasks_per_step, pmf.lr
        finally:
            gin.clear_config()
    assert found == {"benchmark/setups/md_paper.gin": (8, 5e-4), None: (1, 0.01)}


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "benchmark.run", *args], cwd=ROOT, capture_output=True, text=True,
                          **kwargs)


def test_bad_input_exits_2_with_one_line(tmp_path, mini_root):
    for args, message in [
        (["--gin", "methods/nope.gin"], "gin file methods/nope.gin: not found"),
        (["--gin", "methods/smat.gin", "--bind", "smat.num_expert = 4"], "gin:"),
        (["--gin", "benchmark/setups/md_paper.gin", "--gin", "methods/pre.gin"], "SMAT_BENCH_RECORDS"),
        (["--gin", "methods/smat.gin", "--adapt", "fine"], "unknown adapter"),
        (["--gin", "methods/smat.gin", "--adapt", "protonet,fine"], "--adapt fine: unknown adapter"),
        (["--gin", "methods/smat.gin", "--adapt", ",,,"], "--adapt ',,,': names no adapter; choose from protonet"),
        (["--gin", "methods/smat.gin", "--bind", "run.adapters = ()"], "run.adapters = (): give a non-empty tuple"),
        (["--gin", "methods/smat.gin", "--bind", "smat.num_experts = 'x'"], "smat.num_experts = 'x': give an integer"),
        (["--gin", "methods/smat.gin", "--bind", "smat.num_experts = 0"], "smat.num_experts = 0: give an integer >= 1"),
        (["--gin", "methods/smat.gin", "--bind", "smat.target_sparsity = 'high'"],  # once checked in training
         "smat.target_sparsity = 'high': give a number in [0, 1)"),
        (["--gin", "methods/smat.gin", "--bind", "smat.tasks_per_step = 0"], "smat.tasks_per_step = 0: give an integer"),
        (["--gin", "methods/smat.gin", "--bind", "lora.rank = 0"], "lora.rank = 0: give an integer >= 1"),
        (["--gin", "methods/pmf.gin", "--adapt", "gradient_free"], "needs SMAT's experts"),  # before meta-training
        (["--gin", "methods/pmf.gin", "--stage", "train", "--checkpoint", "x.pt"], "not to train from"),
        (["--gin", "methods/pre.gin", "--bind", "run.device = 'cuda:7'"], "run.device = 'cuda:7': this machine has"),
        (["--gin", "methods/pre.gin", "--bind", "run.device = 'tpu'"], "run.device = 'tpu': give 'auto'"),
        (["--gin", "methods/pre.gin", "--bind", "run.test_episodes = 'x'"], "run.test_episodes = 'x': give an integer"),
        (["--gin", "methods/pmf.gin", "--bind", "run.valid_every = 0"], "run.valid_every = 0: give an integer >= 1"),
        (["--gin", "methods/pre.gin", "--bind", "run.test_episodes = 0"], "run.test_episodes = 0: give an integer"),
    ]:
        env = {k: v for k, v in os.environ.items() if k != "SMAT_BENCH_RECORDS"}
        result = cli(*args, "--smoke", "--out", str(tmp_path / "x"), env=env)
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("python -m benchmark.run: error:") and message in last
    assert not (tmp_path / "x").exists()


def test_a_damaged_last_checkpoint_is_one_line_naming_it_and_keeps_the_rows(tmp_path, mini_root, capsys):
    main(["--gin", "methods/pmf.gin", "--smoke", "--out", str(tmp_path / "r")])
    before = (tmp_path / "r" / "episodes.jsonl").read_bytes()
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. a copy cut short
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--gin", "methods/pmf.gin", "--smoke", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and f"{last}: not a smat-bench checkpoint" in err
    assert (tmp_path / "r" / "episodes.jsonl").read_bytes() == before


def test_a_corrupt_record_file_stops_the_run_before_it_claims_its_directory_or_trains(tmp_path, mini_root, capsys):
    root = tmp_path / "records"
    shutil.copytree(mini_root, root, ignore=shutil.ignore_patterns("backbones"))
    broken = root / "mini_digits" / "9.tfrecords"  # a test-only class: read only after meta-training
    broken.write_bytes(broken.read_bytes()[:-100])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--gin", "methods/pmf.gin", "--smoke", "--bind", f"run.records_root = '{root}'",
              "--bind", "run.pretrain_steps = 1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert re.fullmatch(rf"python -m benchmark\.run: error: {re.escape(str(broken))}: record \d+: file truncated "
                        r"\(the record at byte \d+ needs \d+ bytes, \d+ left\); delete the directory .*", err)
    assert not (tmp_path / "run").exists()


def test_adapter_and_fast_path_bindings_are_part_of_the_run_config(mini_root):
    """They are called only after config.gin is written, so gin's operative config alone would miss them."""
    from benchmark.run import build

    plain = build(parse_config(["methods/pmf.gin"], []))
    assert "full.steps" not in plain.config_text
    bound = build(parse_config(["methods/pmf.gin"], ["full.steps = 7", "inference.compile_backbone = False"]))
    assert "full.steps = 7" in bound.config_text and "inference.compile_backbone = False" in bound.config_text
    assert bound.config_hash != plain.config_hash and bound.directory != plain.directory
    macro = [build(parse_config(["methods/pmf.gin"], [f"STEPS = {n}", "full.steps = %STEPS"])) for n in (3, 4)]
    assert "full.steps = 3" in macro[0].config_text and macro[0].config_hash != macro[1].config_hash


def test_evaluating_an_unfinished_run_is_refused(tmp_path, mini_root, capsys):
    main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "train", "--out", str(tmp_path / "r")])
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    rewrite_checkpoint(last, {**state, "step": 1})  # as if training had stopped at update 1 of 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "eval", "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "meta-training stopped at update 1 of 2" in capsys.readouterr().err
    assert not (tmp_path / "r" / "episodes.jsonl").exists()


def test_a_given_checkpoint_is_evaluated_as_a_run_of_its_own(tmp_path, mini_root):
    from benchmark.run import build, build_parser, execute

    main(["--gin", "methods/pmf.gin", "--smoke", "--out", str(tmp_path / "trained")])
    before = (tmp_path / "trained" / "episodes.jsonl").read_text()
    checkpoint = tmp_path / "trained" / "checkpoints" / "best.pt"
    args = ["--gin", "methods/pmf.gin", "--smoke", "--stage", "eval", "--checkpoint", str(checkpoint)]
    with pytest.raises(DataError, match="another operative config"):  # not resumed as the trained run's rows
        execute(build_parser().parse_args([*args, "--out", str(tmp_path / "trained")]))
    assert (tmp_path / "trained" / "episodes.jsonl").read_text() == before
    config = parse_config(["methods/pmf.gin"], ["run.smoke = True"])
    assert build(config, checkpoint=checkpoint).config_hash != build(config).config_hash
    main([*args, "--out", str(tmp_path / "evaluated")])
    assert len(rows(tmp_path / "evaluated")) == len(rows(tmp_path / "trained"))


RESUME_ARGS = ["--gin", "methods/smat.gin", "--bind", "run.train_episodes = 40", "--bind", "run.checkpoint_every = 2",
               "--bind", "run.valid_every = 3", "--bind", "run.test_episodes = 2"]


def test_sigkill_then_rerun_gives_the_uninterrupted_results(tmp_path, mini_root):
    """Killed at any moment, the same command continues; on CPU the outcome equals an uninterrupted run's."""
    reference = cli(*RESUME_ARGS, "--out", str(tmp_path / "whole"))
    assert reference.returncode == 0, reference.stderr
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "benchmark.run", *RESUME_ARGS, "--out", str(killed_dir)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    last = killed_dir / "checkpoints" / "last.pt"
    while time.time() < deadline and process.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["step"] >= 4:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = cli(*RESUME_ARGS, "--out", str(killed_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    again = torch.load(last, weights_only=True)
    assert whole["step"] == again["step"] == 10
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "whole")) == strip(rows(killed_dir))
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 11))


def test_two_gloo_processes_train_and_evaluate_like_one(tmp_path, mini_root):
    """Each process takes its share of every meta-update's tasks; summed gradients give the one-process update."""
    args = ["--gin", "methods/pmf.gin", "--bind", "pmf.tasks_per_step = 2", "--bind", "run.train_episodes = 8",
            "--bind", "run.test_episodes = 3", "--bind", "run.valid_every = 2"]
    single = cli(*args, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    procs, outputs = two_processes(*args, "--out", str(tmp_path / "two"), port=29631)
    assert all(p.returncode == 0 for p in procs), outputs
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert one["step"] == two["step"] == 4 and len(two["torch_rng"]) == 2
    for name, tensor in one["model"].items():
        assert torch.allclose(tensor, two["model"][name], atol=1e-5), name
    key = lambda r: (r["source"], r["episode"])  # noqa: E731
    rows_one, rows_two = sorted(rows(tmp_path / "one"), key=key), sorted(rows(tmp_path / "two"), key=key)
    assert [key(r) for r in rows_one] == [key(r) for r in rows_two] and len(rows_two) == 6 * 3
    assert [r["episode_digest"] for r in rows_one] == [r["episode_digest"] for r in rows_two]
    assert [r["accuracy"] for r in rows_one] == pytest.approx([r["accuracy"] for r in rows_two], abs=0.02)
    assert len({(r["source"], r["lr"]) for r in rows_two}) == len({r["source"] for r in rows_two})
    assert {r["run_id"][-3:] for r in rows_two} == {"-w2"} and not re.search(r"-w\d+$", rows_one[0]["run_id"])
    # an evaluation cut short and finished by one process (the same command: training is done) keeps the
    # run id of the two that trained the model
    episodes = tmp_path / "two" / "episodes.jsonl"
    episodes.write_text("".join(line + "\n" for line in episodes.read_text().splitlines()[:5]))
    finished = cli(*args, "--out", str(tmp_path / "two"))
    assert finished.returncode == 0, finished.stderr
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert untimed(sorted(rows(tmp_path / "two"), key=key)) == untimed(rows_two)
    # a refused run directory stops both processes (the second one used to wait for the first)
    procs, outputs = two_processes(*args, "--bind", "run.test_episodes = 2", "--out", str(tmp_path / "two"), port=29632,
                                   timeout=300)
    assert all(p.returncode == 2 and "holds a run with another operative config" in err
               for p, (_, err) in zip(procs, outputs)), outputs


def test_run_ids_name_the_processes_that_trained_the_model(tmp_path, mini_root):
    """Pre, which does not train, runs on two processes (whatever its tasks_per_step) and has no ``-wN``;
    meta-training that cannot split its tasks over them is refused before the run directory exists; a run
    whose checkpoints predate the recorded process count takes it from the RNG states of its ``last.pt``."""
    procs, outputs = two_processes("--gin", "methods/pre.gin", "--smoke", "--out", str(tmp_path / "pre"), port=29633)
    assert all(p.returncode == 0 for p in procs), outputs
    procs, outputs = two_processes("--gin", "methods/pmf.gin", "--smoke", "--bind", "pmf.tasks_per_step = 3",
                                   "--out", str(tmp_path / "odd"), port=29634)
    assert all(p.returncode == 2 and "cannot be split over 2 processes" in err
               for p, (_, err) in zip(procs, outputs)), outputs
    assert not (tmp_path / "odd").exists()
    assert {r["run_id"] for r in rows(tmp_path / "pre")} == {rows(tmp_path / "pre")[0]["run_id"]}
    assert not re.search(r"-w\d+$", rows(tmp_path / "pre")[0]["run_id"])
    main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "train", "--out", str(tmp_path / "pmf")])
    for name in ("best.pt", "last.pt"):  # as an older version wrote them after two processes trained
        path = tmp_path / "pmf" / "checkpoints" / name
        state = torch.load(path, weights_only=True)
        del state["processes"]
        if "torch_rng" in state:
            state["torch_rng"], state["cuda_rng"] = state["torch_rng"] * 2, state["cuda_rng"] * 2
        rewrite_checkpoint(path, state)
    main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "eval", "--out", str(tmp_path / "pmf")])
    assert {r["run_id"][-3:] for r in rows(tmp_path / "pmf")} == {"-w2"}


def two_processes(*args, port, timeout=600):
    """(processes, their (stdout, stderr)) of ``python -m benchmark.run ARGS`` as two gloo processes."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-m", "benchmark.run", *args], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    return procs, [p.communicate(timeout=timeout) for p in procs]


# --- the run directory: one process, one run, its inputs, its files ------------------------------------------------

PRE_SMOKE = ["--gin", "methods/pre.gin", "--smoke"]


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_run_directory_held_by_a_process_is_refused_naming_it(tmp_path, mini_root, capsys):
    from benchmark.rundir import locked

    run = tmp_path / "run"
    main([*PRE_SMOKE, "--out", str(run)])
    before = (run / "episodes.jsonl").read_bytes()
    with locked(run):  # as another process running in it would hold it
        with pytest.raises(SystemExit) as exit_info:
            main([*PRE_SMOKE, "--out", str(run)])
    err = last_error(capsys)
    assert exit_info.value.code == 2 and f"{run} is in use by pid {os.getpid()} on host" in err and "since" in err
    assert (run / "episodes.jsonl").read_bytes() == before
    main([*PRE_SMOKE, "--out", str(run)])  # the lock went with its holder
    assert (run / "episodes.jsonl").read_bytes() == before


def test_readers_count_each_episode_once(tmp_path, mini_root, capsys):
    """Two processes on one run directory (before it had a lock) wrote every row twice: the printed summary and
    ``slurm.sweep --status`` count each episode once, and a resumed run writes none again."""
    from slurm.sweep import _rows

    run = tmp_path / "run"
    main([*PRE_SMOKE, "--out", str(run)])
    episodes = run / "episodes.jsonl"
    episodes.write_text(episodes.read_text() * 2)
    doubled = episodes.read_text()
    capsys.readouterr()
    main([*PRE_SMOKE, "--out", str(run)])
    summary = capsys.readouterr().out
    assert "(n=2)" in summary and "(n=4)" not in summary
    assert episodes.read_text() == doubled and _rows(run) == 6 * 2


def test_a_directory_a_run_did_not_make_is_refused(tmp_path, mini_root, capsys):
    """Rows without a config.gin are not adopted; rows of another run or config in a run directory are refused."""
    other, pre = tmp_path / "other", tmp_path / "pre"
    main([*PRE_SMOKE, "--bind", "run.seed = 1", "--out", str(other)])  # another config
    (other / "config.gin").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main([*PRE_SMOKE, "--out", str(other)])
    assert exit_info.value.code == 2 and "but no config.gin" in last_error(capsys)
    assert not (other / "config.gin").exists()
    main([*PRE_SMOKE, "--out", str(pre)])
    theirs = (other / "episodes.jsonl").read_text()
    (pre / "episodes.jsonl").write_text(theirs)
    with pytest.raises(SystemExit) as exit_info:
        main([*PRE_SMOKE, "--out", str(pre)])
    err = last_error(capsys)
    assert exit_info.value.code == 2 and f"{pre / 'episodes.jsonl'}:1: a row of run pre-" in err and "not of this run" in err
    assert (pre / "episodes.jsonl").read_text() == theirs


def test_changed_records_are_refused_and_copied_ones_resume(tmp_path, mini_root, monkeypatch, capsys):
    """Another records root (here the mini benchmark's, via SMAT_BENCH_CACHE) leaves the config hash alone: its
    records must be those the run was made from, by content (a copy with new file times is fine)."""
    import shutil

    from benchmark.records import RecordFile, write_records

    run = tmp_path / "run"
    main([*PRE_SMOKE, "--out", str(run)])
    copy = tmp_path / "cache" / mini_root.name
    shutil.copytree(mini_root, copy)
    monkeypatch.setenv("SMAT_BENCH_CACHE", str(copy.parent))
    main([*PRE_SMOKE, "--out", str(run)])  # the same records elsewhere
    class_file = next((copy / "mini_digits").glob("*.tfrecords"))
    records = RecordFile(class_file)
    payloads = [records.read(i) for i in range(len(records))]
    records.close()
    write_records(class_file, [payloads[1], payloads[0], *payloads[2:]])  # the same count, another content
    before = (run / "episodes.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*PRE_SMOKE, "--out", str(run)])
    err = last_error(capsys)
    assert exit_info.value.code == 2 and "the records of source 'mini_digits'" in err and "another --out" in err
    assert (run / "episodes.jsonl").read_bytes() == before


def test_a_changed_checkpoint_is_refused(tmp_path, mini_root, capsys):
    run = tmp_path / "run"
    main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "train", "--out", str(run)])
    best = run / "checkpoints" / "best.pt"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit of a weight: the file still loads
    best.write_bytes(data)
    with pytest.raises(SystemExit) as exit_info:
        main(["--gin", "methods/pmf.gin", "--smoke", "--stage", "eval", "--out", str(run)])
    err = last_error(capsys)
    assert exit_info.value.code == 2 and f"{best}: its SHA-256 is not that of the checkpoint this run wrote" in err
    assert not (run / "episodes.jsonl").exists()


def test_a_corrupt_result_row_is_one_line_naming_file_and_line(tmp_path, mini_root, capsys):
    run = tmp_path / "run"
    main([*PRE_SMOKE, "--out", str(run)])
    episodes = run / "episodes.jsonl"
    lines = episodes.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # e.g. two writers interleaved
    episodes.write_text("".join(lines))
    with pytest.raises(SystemExit) as exit_info:
        main([*PRE_SMOKE, "--out", str(run)])
    err = last_error(capsys)
    assert exit_info.value.code == 2 and f"{episodes}:3: not a JSON object" in err and "delete that line" in err
    assert episodes.read_text() == "".join(lines)


def test_a_torn_last_metrics_line_is_cut_off_like_a_torn_row(tmp_path, mini_root):
    run = tmp_path / "run"
    args = ["--gin", "methods/pmf.gin", "--smoke", "--stage", "train", "--out", str(run)]
    main(args)
    last, metrics = run / "checkpoints" / "last.pt", run / "metrics.jsonl"
    whole = metrics.read_text()
    rewrite_checkpoint(last, {**torch.load(last, weights_only=True), "step": 1})  # killed after update 1...
    metrics.write_text("".join(whole.splitlines(keepends=True)[:1]) + '{"kind": "train", "st')  # ...writing update 2
    main(args)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in whole.splitlines()]


def enospc(name, after):
    """An ``os.write`` that writes ``after`` lines to the file ``name``, then part of one and fails: a disk filling up."""
    import errno

    real, written = os.write, []

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            return real(fd, data)
        if len(written) == after:
            real(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(1)
        return real(fd, data)

    return write


def test_a_full_disk_while_writing_a_row_keeps_every_row_before_it(tmp_path, mini_root, monkeypatch, capsys):
    import benchmark.files

    run = tmp_path / "run"
    monkeypatch.setattr(benchmark.files.os, "write", enospc("episodes.jsonl", after=5))
    with pytest.raises(SystemExit) as exit_info:
        main([*PRE_SMOKE, "--out", str(run)])
    err = last_error(capsys)
    assert exit_info.value.code == 2 and f"{run / 'episodes.jsonl'}: cannot write it (No space left on device)" in err
    assert len(rows(run)) == 5 and (run / "episodes.jsonl").read_text().endswith("\n")
    monkeypatch.undo()
    main([*PRE_SMOKE, "--out", str(run)])
    assert len(rows(run)) == 6 * 2


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_one_before(tmp_path, mini_root, monkeypatch, capsys):
    import errno

    import benchmark.run

    run, real, saved = tmp_path / "run", torch.save, []

    def save(state, path):
        if saved:  # best.pt is written, then last.pt fails half-way
            Path(path).write_bytes(b"part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(path)
        real(state, path)

    monkeypatch.setattr(benchmark.run.torch, "save", save)
    args = ["--gin", "methods/pmf.gin", "--smoke", "--stage", "train", "--out", str(run)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    last = run / "checkpoints" / "last.pt"
    assert exit_info.value.code == 2 and f"{last}: cannot write it (No space left on device)" in last_error(capsys)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt"]
    monkeypatch.undo()
    main(args)
    assert torch.load(last, weights_only=True)["step"] == 2
