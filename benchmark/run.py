"""``python -m benchmark.run``: meta-train, select on validation episodes, meta-test, record (contract C2).

    python -m benchmark.run --gin FILE [--gin FILE ...] [--bind 'name.param = value' ...] [--out RUN_DIR]
           [--stage train|eval|all] [--checkpoint PATH] [--adapt ADAPTER[,ADAPTER...]] [--smoke]

Configuration is gin: the files, then the bindings, then the locked config. With no benchmark bound
(``run.benchmark``), ``benchmark/setups/md_mini.gin`` is read first and the embedded mini benchmark
runs. After the method, the benchmark and the backbone are built, the operative config is written
to ``RUN_DIR/config.gin``; its SHA-256 is the run's ``config_hash`` and names the default run
directory. The same command on an existing run directory resumes it (training from the last
checkpoint, evaluation from the first missing episode). Refused: a run directory made with another
operative config, one that holds files but no ``config.gin`` (not made by a run), one another process
is running in (its lock names it), and one whose records or checkpoints changed since they were
recorded (`benchmark.rundir`).

A run directory holds ``config.gin``, ``metrics.jsonl`` (one line per meta-update and per validation),
``checkpoints/last.pt`` (everything needed to continue) and ``checkpoints/best.pt`` (the weights with
the best mean validation accuracy), ``lr_search.json``, ``episodes.jsonl`` (contract C3),
``fingerprints.json`` (the SHA-256 of the sources' specs and records and of the checkpoints) and
``.run.lock`` (held by the process running in it).
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import gin
import torch
from tqdm import tqdm

import methods
from benchmark import distributed, rundir
from benchmark.checks import check, check_bindings
from benchmark.episodes import BenchmarkData, episode_loader
from benchmark.files import append_line, write_failed, write_json, write_text
from benchmark.config import RunConfig
from benchmark.evaluate import evaluate
from benchmark.pretrain import pretrained_weights
from benchmark.results import ResultsStore, read_jsonl
from methods import Task, create_backbone, create_method
from methods.adapters import ADAPTERS, get_adapter
from registry.catalog import get_benchmark
from registry.errors import CommandParser, DataError, exit_on_error

__all__ = ["main", "execute"]

PROG = "python -m benchmark.run"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MINI_SETUP = "benchmark/setups/md_mini.gin"
CHECKPOINT_FORMAT = 1


SMOKE = dict(train_steps=2, valid_episodes=1, test_episodes=2, search_episodes=1, lr_grid=(0.0, 1e-3))


# --- configuration ----------------------------------------------------------------------------------


def _resolve_gin_file(path):
    for candidate in (Path(path), PROJECT_ROOT / path):
        if candidate.is_file():
            return str(candidate)
    raise DataError(f"gin file {path}: not found (looked in . and {PROJECT_ROOT}); e.g. --gin methods/smat.gin")


def parse_config(gin_files, bindings):
    """Parse ``gin_files`` then ``bindings``; return the `RunConfig`, its values and those bound for the
    functions a run calls later (`benchmark.checks`) checked.

    When they bind no ``run.benchmark``, the mini setup is parsed first and the run says so.
    """
    files = [_resolve_gin_file(f) for f in gin_files]
    gin.add_config_file_search_path(str(PROJECT_ROOT))
    for attempt in ("as given", "with the mini setup"):
        gin.clear_config()
        try:
            gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
        except (ValueError, KeyError, TypeError, ImportError, SyntaxError) as err:
            raise DataError(f"gin: {' '.join(str(err).split())}; check the --gin files and --bind values") from None
        try:
            bound = gin.query_parameter("run.benchmark")
        except ValueError:
            bound = None
        if bound is not None or attempt != "as given":
            break
        print(f"no benchmark bound (run.benchmark): running the embedded mini benchmark md_mini ({MINI_SETUP})",
              file=sys.stderr)
        files = [_resolve_gin_file(MINI_SETUP)] + files
    gin.finalize()
    try:
        check_bindings()
        config = RunConfig()
    except (ValueError, TypeError) as err:
        raise DataError(f"gin: {' '.join(str(err).split())}") from None
    method = methods.method_class(config.method)  # its values are checked when it is built; here slurm sees them too
    check(method.name, gin.get_bindings(method.name), method.rules)
    return config


def code_version():
    """The git commit of the code; outside git, ``$SMAT_BENCH_CODE_VERSION`` (set by whoever copied the code
    without its git directory, e.g. to a GPU machine), else the package version.

    ``+dirty``: tracked files differ from the commit, or an untracked Python file is there (a method added
    in one file, not yet committed). Other untracked files (run directories, notes) do not count, and gin
    files need not: their bindings are in the config hash.
    """
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") or git("ls-files", "--others",
                                                                              "--exclude-standard", "--", "*.py")
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        if os.environ.get("SMAT_BENCH_CODE_VERSION"):
            return os.environ["SMAT_BENCH_CODE_VERSION"]
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"smat-bench {version('smat-bench')}"
        except PackageNotFoundError:
            return "unknown (neither a git checkout nor an installed package)"


# --- building the run --------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A configured run: its config, data, method and directory."""

    config: RunConfig
    data: BenchmarkData
    method: methods.Method
    directory: Path
    config_text: str
    config_hash: str
    device: torch.device
    trained_code_version: str | None = None  # the code version that wrote the evaluated checkpoint
    trained_processes: int | None = None  # the processes that meta-trained the evaluated checkpoint

    @property
    def variant(self):
        return getattr(self.method, "variant", "default")

    @property
    def run_id(self):
        """method-variant-benchmark-hash, plus ``-wN`` for a model meta-trained by N > 1 processes (their noise
        streams differ from one's). N is that of the training, however many processes evaluate."""
        processes = self.trained_processes or (distributed.world_size() if self.method.trains else 1)
        suffix = f"-w{processes}" if processes > 1 else ""
        return f"{self.config.method}-{self.variant}-{self.data.benchmark.name}-{self.config_hash[:10]}{suffix}"

    def row_info(self):
        return dict(run_id=self.run_id, method=self.config.method, variant=self.variant, backbone=self.config.backbone,
                    config_hash=self.config_hash, code_version=code_version(),
                    trained_code_version=self.trained_code_version, smoke=self.config.smoke,
                    device=_device_name(self.device))


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_device(name):
    """The device ``run.device`` names on this machine (``auto``: CUDA when there is one).

    Raises:
        DataError: it names a CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise DataError(f"run.device = {name!r}: this machine has {count} CUDA device(s); bind run.device = 'auto' "
                        "or 'cpu', or run it on a GPU node")
    return device


def build(config, out=None, checkpoint=None):
    """Data, backbone, method, operative config and run directory of ``config``.

    A run that evaluates a given ``checkpoint`` file has the file's SHA-256 in its config (and so its own
    hash, run id and directory): its rows are never taken for those of another checkpoint.
    """
    if config.method not in methods.list_methods():
        methods.method_class(config.method)  # raises with the close matches
    benchmark = get_benchmark(config.benchmark or "md_mini")
    data = BenchmarkData(benchmark, config.records_root, config.decoded_cache)
    device = distributed.setup(resolve_device(config.device))
    weights = config.weights_file
    if weights is None and config.pretrain_steps > 0:
        if distributed.is_main():  # one process pre-trains and caches; the others then find the file
            pretrained_weights(data, config.backbone, config.pretrain_steps)
        distributed.barrier()
        weights = pretrained_weights(data, config.backbone, config.pretrain_steps)
    torch.manual_seed(config.seed)  # the same initialisation in every process
    backbone = create_backbone(config.backbone, pretrained=True, weights_file=weights)
    method = create_method(config.method, backbone=backbone).to(device)
    if distributed.world_size() > 1:
        torch.manual_seed(config.seed + 1_000 * distributed.rank())  # independent noise per process
    text = gin.operative_config_str() + _later_bindings()
    if checkpoint is not None:
        text += f"\n# Evaluated checkpoint (not trained by this run): sha256 {_file_sha256(checkpoint)}\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    directory = Path(out) if out else Path("runs") / f"{config.method}-{benchmark.name}-{digest[:10]}"
    return Run(config, data, method, directory, text, digest, device)


def _file_sha256(path):
    try:
        return rundir.file_sha256(path)
    except FileNotFoundError:
        raise DataError(f"--checkpoint {path}: no such file") from None


LATER_CONFIGURABLES = ("inference", "differentiable", "hard_concrete", "dense_teacher", "full", "lora", "gradient_free",
                       "full_joint")


def _later_bindings():
    """Gin lines of the bindings of `LATER_CONFIGURABLES`, which a run first calls after its config is
    written (gin's operative config lists only what has run), so that they too are in ``config.gin``
    and its hash; '' when none is bound."""
    lines = [f"{name}.{key} = {value!r}" for name in LATER_CONFIGURABLES  # macros resolved to their values
             for key, value in sorted(gin.get_bindings(name).items())]
    header = "# Parameters for adapters and fast-path switches (bound; used after this file is written):"
    return "\n".join(["", header, *lines, ""]) if lines else ""


@contextlib.contextmanager
def claimed(run):
    """Hold the run directory for the block: create it, or check that an existing one was made by the same
    operative config; take its lock; record or check its records and checkpoints (`benchmark.rundir`).

    Rank 0 claims and holds the lock for the whole run (the other ranks write nothing there); a refusal
    is raised by every rank (the others would otherwise wait for it at the next collective)."""
    with contextlib.ExitStack() as held:
        refusal = None
        if distributed.is_main():
            try:
                _claim(run, held)
            except (DataError, OSError) as err:
                refusal = str(err)
        refusal = distributed.gather_objects(refusal)[0]
        if refusal is not None:
            raise DataError(refusal)
        yield


def _claim(run, held):
    config_file = run.directory / "config.gin"
    if config_file.exists():
        if config_file.read_text() != run.config_text:
            raise DataError(
                f"{run.directory} holds a run with another operative config ({config_file}); choose another --out "
                "or use the same --gin files and --bind values to resume it"
            )
    elif run.directory.exists():
        foreign = sorted(p.name for p in run.directory.iterdir() if p.name not in rundir.BEFORE_THE_RUN)
        if foreign:
            raise DataError(
                f"{run.directory} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} but no config.gin: "
                "not a directory this run made (or its config.gin was removed), and its files would be taken for "
                "this run's; choose another --out"
            )
    held.enter_context(rundir.locked(run.directory))
    if not config_file.exists():
        write_text(config_file, run.config_text)
    rundir.check_records(run.directory, run.data)
    rundir.check_checkpoints(run.directory)


# --- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(path, run, step, best_valid, with_training_state=True):
    """Atomically write the method and (optionally) everything needed to continue training; its SHA-256 is
    recorded in the run (`benchmark.rundir.replace_checkpoint`).

    Raises:
        DataError: the write failed (e.g. a full disk); the checkpoint before it is kept, no temporary file.
    """
    state = dict(format=CHECKPOINT_FORMAT, method=run.config.method, variant=run.variant, config_hash=run.config_hash,
                 code_version=code_version(), processes=distributed.world_size(), step=step, best_valid=best_valid,
                 model=run.method.state_dict())
    if with_training_state:
        rng = distributed.gather_objects(
            (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))
        state.update(training=run.method.training_state(), torch_rng=[r[0] for r in rng], cuda_rng=[r[1] for r in rng])
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        rundir.replace_checkpoint(run.directory, tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        raise write_failed(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path, mmap=False):
    """The state dict of the checkpoint at ``path`` (``weights_only``; ``mmap``: tensors not read until
    used); a missing, corrupt or foreign file is one `DataError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DataError(f"--checkpoint {path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file: one clear message
        raise DataError(f"{path}: not a smat-bench checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a smat-bench checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def load_checkpoint(path, run):
    """The checkpoint at ``path`` (`read_checkpoint`), checked to belong to this run's method, loaded into it;
    the code version and process count that wrote it become the run's ``trained_code_version`` and
    ``trained_processes``."""
    state = read_checkpoint(path)
    if (state["method"], state["variant"]) != (run.config.method, run.variant):
        raise DataError(
            f"{path} is a checkpoint of method {state['method']!r} (variant {state['variant']!r}), "
            f"but this run is {run.config.method!r} (variant {run.variant!r}); pass the matching --gin files"
        )
    try:
        run.method.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DataError(f"{path}: its tensors do not fit this model ({' '.join(str(err).split())[:300]})") from None
    run.trained_code_version = state.get("code_version")
    run.trained_processes = state.get("processes") or _processes_before_they_were_recorded(state, path)
    return state


def _processes_before_they_were_recorded(state, path):
    """The training processes of a checkpoint written before checkpoints recorded them: the count of its
    RNG states, else of those of ``last.pt`` beside it (``best.pt`` had none); None if neither is there."""
    last = Path(path).with_name("last.pt")
    if "torch_rng" not in state and last.is_file():
        state = read_checkpoint(last, mmap=True)
    return len(state.get("torch_rng", ())) or None


# --- training ----------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``: one JSON line per meta-update or validation; rows past a resumed step are dropped,
    and so is a torn last line (a kill in the middle of a write), as in ``episodes.jsonl``."""

    def __init__(self, path, keep_until_step):
        self.path = path
        fix = "delete that line (a metrics row; the run goes on without it)"
        rows = [row for _, row in read_jsonl(path, fix, repair=True)]
        kept = [r for r in rows if r.get("step", math.inf) <= keep_until_step]
        if len(kept) != len(rows):
            write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write(self, row):
        append_line(self.path, json.dumps(row, sort_keys=True))


def validate(run, episodes_per_source):
    """Mean ProtoNet accuracy over the fixed VALID episodes of every valid source (split across processes)."""
    run.method.eval()
    accs = []
    for source in run.data.benchmark.valid_sources:
        episodes = run.data.eval_episodes(source.name, "valid", num_episodes=episodes_per_source)
        mine = list(range(distributed.rank(), len(episodes), distributed.world_size()))
        for episode in episode_loader(torch.utils.data.Subset(episodes, mine), run.config.workers, run.device.type == "cuda"):
            task = Task.from_episode(episode, run.device)
            predictions = run.method.task_model(task.support_x, task.support_y, task.ways).predict(task.query_x)
            accs.append(float((predictions == task.query_y).float().mean()))
    accs = [a for share in distributed.gather_objects(accs) for a in share]
    return sum(accs) / len(accs) if accs else float("nan")


def total_steps(run):
    """Meta-updates of the whole run."""
    return SMOKE["train_steps"] if run.config.smoke else math.ceil(run.config.train_episodes / run.method.tasks_per_step)


def trained_steps(run):
    """Meta-updates done so far (those of ``checkpoints/last.pt``; 0 without it), read without loading its tensors."""
    last = run.directory / "checkpoints" / "last.pt"
    return read_checkpoint(last, mmap=True)["step"] if last.exists() else 0


def train(run):
    """Meta-train from the last checkpoint (or the start), validating and checkpointing as configured;
    returns the checkpoint to evaluate, with the method's training state freed (`Method.end_training`)."""
    config, method = run.config, run.method
    tasks_per_step = method.tasks_per_step
    total = total_steps(run)
    valid_episodes = SMOKE["valid_episodes"] if config.smoke else run.data.benchmark.valid_episodes
    last, best = run.directory / "checkpoints" / "last.pt", run.directory / "checkpoints" / "best.pt"
    method.configure_training(total)
    step, best_valid = 0, -1.0
    if last.exists():
        state = load_checkpoint(last, run)
        method.load_training_state(state["training"])
        if len(state["torch_rng"]) != distributed.world_size():
            raise DataError(f"{last} was written by {len(state['torch_rng'])} process(es); resume it with as many")
        torch.set_rng_state(state["torch_rng"][distributed.rank()])
        if state["cuda_rng"][distributed.rank()]:
            torch.cuda.set_rng_state_all(state["cuda_rng"][distributed.rank()])
        step, best_valid = state["step"], state["best_valid"]
        print(f"resuming {run.directory} at meta-update {step}/{total}", file=sys.stderr)
    log = MetricsLog(run.directory / "metrics.jsonl", step) if distributed.is_main() else None
    if step >= total:
        method.end_training()
        return best if best.exists() else last
    stream = run.data.train_episodes(config.seed, (total - step) * tasks_per_step, start=step * tasks_per_step)
    mine = [i for i in range(len(stream)) if i % distributed.world_size() == distributed.rank()]
    share = tasks_per_step // distributed.world_size()  # task j of a meta-update goes to process j mod W
    batch = []
    bar = tqdm(total=total, initial=step, desc=f"meta-training {config.method}", file=sys.stderr, mininterval=5,
               disable=not distributed.is_main())
    for episode in episode_loader(torch.utils.data.Subset(stream, mine), config.workers, run.device.type == "cuda"):
        batch.append(Task.from_episode(episode, run.device))
        if len(batch) < share:
            continue
        started = time.perf_counter()
        metrics = method.meta_train_step(batch, total_tasks=tasks_per_step)
        batch, step = [], step + 1
        if log:
            log.write(dict(step=step, kind="train", seconds=time.perf_counter() - started, **metrics))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['query_acc']:.2f}", refresh=False)
        if step % config.valid_every == 0 or step == total:
            accuracy = validate(run, valid_episodes)
            if log:
                log.write(dict(step=step, kind="valid", accuracy=accuracy))
            if accuracy > best_valid:
                best_valid = accuracy
                save_checkpoint(best, run, step, best_valid, with_training_state=False)
        if step % config.checkpoint_every == 0 or step == total:
            save_checkpoint(last, run, step, best_valid)
    bar.close()
    distributed.barrier()
    method.end_training()
    return best if best.exists() else last


# --- the command --------------------------------------------------------------------------------------


def run_bindings(args):
    """The gin bindings of a parsed command line: the ``--bind`` values, then ``--smoke`` and ``--adapt`` as
    bindings of ``run``. An ``--adapt`` naming no adapter, or an unknown one, raises DataError; a name given
    twice counts once."""
    bindings = list(args.bind)
    if args.smoke:
        bindings.append("run.smoke = True")
    if args.adapt is not None:
        names = list(dict.fromkeys(a.strip() for a in args.adapt.split(",") if a.strip()))
        unknown = [a for a in names if a not in ADAPTERS]
        if unknown or not names:
            what = f"{','.join(unknown)}: unknown adapter" if unknown else f"{args.adapt!r}: names no adapter"
            raise DataError(f"--adapt {what}; choose from {', '.join(ADAPTERS)}, e.g. --adapt protonet,full")
        bindings.append(f"run.adapters = {tuple(names)!r}")
    return bindings


def execute(args):
    """What ``python -m benchmark.run`` does with parsed arguments; returns the run directory."""
    config = parse_config(args.gin, run_bindings(args))
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and args.stage == "train":
        raise DataError("--checkpoint names a checkpoint to evaluate, not to train from: use --stage eval (or all)")
    job = build(config, args.out, checkpoint)
    for name in config.adapters:
        get_adapter(name, job.method)  # an adapter that does not apply fails now, not after meta-training
    done, total = trained_steps(job), total_steps(job)  # before any training; the eval stage reads them too
    trains = args.stage in ("train", "all") and checkpoint is None and job.method.trains and done < total
    if trains and job.method.tasks_per_step % distributed.world_size():
        raise DataError(
            f"{config.method}.tasks_per_step = {job.method.tasks_per_step} cannot be split over "
            f"{distributed.world_size()} processes for meta-training; bind it to a multiple of the process count"
        )
    print(job.data.check(trains, args.stage in ("eval", "all"), progress=distributed.is_main()), file=sys.stderr)
    with claimed(job):
        print(f"run in {job.directory} on {_device_name(job.device)}", file=sys.stderr)
        if trains:
            checkpoint = train(job)
        if args.stage in ("eval", "all"):
            _evaluate(job, checkpoint, done, total)
        if distributed.is_main():
            write_report(job)
        distributed.barrier()
    return job.directory


def _evaluate(job, checkpoint, done, total):
    """Meta-test ``checkpoint`` (else the run's ``best.pt``, or the untrained method) into ``episodes.jsonl``
    and print the summary; ``done`` of ``total`` meta-updates were trained when the command started."""
    config = job.config
    if checkpoint is not None:
        load_checkpoint(checkpoint, job)
    elif job.method.trains:
        best = job.directory / "checkpoints" / "best.pt"
        if not best.exists():
            raise DataError(f"{job.directory}: no checkpoint to evaluate; run --stage train first or pass --checkpoint")
        if done < total:
            raise DataError(
                f"{job.directory}: meta-training stopped at update {done} of {total}, so its rows would not be "
                "those of the trained model; finish it (the same command with --stage all), or evaluate a "
                f"checkpoint as a run of its own with --checkpoint {best}"
            )
        load_checkpoint(best, job)
    info = job.row_info()
    store = ResultsStore(job.directory / "episodes.jsonl", run=info)
    smoke = config.smoke
    summary = evaluate(
        job.method, job.data, config.adapters, store, info, device=job.device,
        lr_grid=SMOKE["lr_grid"] if smoke else config.lr_grid,
        search_episodes=SMOKE["search_episodes"] if smoke else config.search_episodes,
        num_episodes=SMOKE["test_episodes"] if smoke else config.test_episodes,
        workers=config.workers, lr_cache=job.directory / "lr_search.json",
    )
    if distributed.is_main():
        _print_summary(job, summary)


def write_report(job):
    """``RUN_DIR/method_report.json``: the method's summary of its learned state (experts, sparsity, λ)."""
    report = job.method.report()
    if report:
        write_json(job.directory / "method_report.json", report, sort_keys=True)


def _print_summary(job, summary):
    print(f"\nresults of {job.run_id} ({job.directory / 'episodes.jsonl'}):")
    by_source = {}
    for (adapter, source), (mean, ci, n) in summary.items():
        by_source.setdefault(source, []).append(f"{adapter} {100 * mean:6.2f} ± {100 * ci:5.2f} (n={n})")
    for source, cells in by_source.items():
        print(f"  {source:<16} " + "   ".join(cells))
    for adapter in dict.fromkeys(a for a, _ in summary):
        for role in ("id", "ood"):
            means = [m for (a, s), (m, _, _) in summary.items()
                     if a == adapter and job.data.source(s).source.role == role]
            if means:
                print(f"  {role.upper()} avg ({adapter}): {100 * sum(means) / len(means):.2f}")


def build_parser():
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin", action="append", required=True, help="gin file (repeatable), e.g. methods/smat.gin")
    parser.add_argument("--bind", action="append", default=[], help="gin binding, e.g. 'smat.num_experts = 4'")
    parser.add_argument("--out", help="run directory (default runs/<method>-<benchmark>-<config hash>)")
    parser.add_argument("--stage", choices=("train", "eval", "all"), default="all")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint instead of training")
    parser.add_argument("--adapt", help=f"meta-test adapters, comma-separated: {', '.join(ADAPTERS)}")
    parser.add_argument("--smoke", action="store_true", help="a tiny version of the same job to check the wiring")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG):
        try:
            execute(args)
        finally:
            distributed.shutdown()


if __name__ == "__main__":
    main()

