"""``python -m slurm.launch``: submit one ``python -m benchmark.run`` job through submitit.

    python -m slurm.launch --gin FILE [--gin FILE ...] [--bind ...] [--out RUN_DIR] [every benchmark.run option]
           [--partition P] [--gpus-per-node N] [--tasks-per-node N] [--cpus-per-task C] [--mem-gb M]
           [--timeout-min T] [--account A] [--qos Q] [--constraint X] [--slurm KEY=VALUE ...] [--local] [--wait]

The parser takes ``benchmark.run``'s as a parent, so every run option passes through unchanged; the
job runs exactly that command line (`slurm.job.BenchmarkJob`). Cluster options map onto submitit's
generic names (``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``) or its ``slurm_``
ones (``--partition`` -> ``slurm_partition``); ``--slurm KEY=VALUE`` passes anything else through as
``slurm_KEY`` (values are Python literals when they parse as one, else strings), applied last. Before
anything is submitted the gin files and bindings are parsed, and the partition, its GPUs and CPUs are
checked with ``sinfo``; a refusal is one line and exit status 2. ``--gpus-per-node N`` runs N tasks
(one per GPU) in one torch.distributed group. ``--local`` runs the job with submitit's local executor
on this machine (no cluster). Prints the job id, the run directory and the log file.
"""

import ast
import contextlib
import io
import sys
from pathlib import Path

from registry.errors import CommandParser, DataError, exit_on_error
from slurm.cluster import check_local_request, check_request, executor_parameters, make_executor
from slurm.job import BenchmarkJob

__all__ = ["main", "submit", "build_parser", "cluster_parser", "run_argv", "parameters_from_args", "check_config",
           "submit_jobs"]

PROG = "python -m slurm.launch"


def cluster_parser():
    """The cluster options shared by ``slurm.launch`` and ``slurm.sweep`` (a parent parser, no ``-h``)."""
    parser = CommandParser(add_help=False)
    group = parser.add_argument_group("cluster (submitit / SLURM)")
    group.add_argument("--partition", help="SLURM partition (default: the cluster's default partition)")
    group.add_argument("--gpus-per-node", type=int, help="GPUs; runs one task per GPU with torch.distributed")
    group.add_argument("--tasks-per-node", type=int,
                       help="processes in the torch.distributed group (default: --gpus-per-node, else 1)")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per task (default: the cluster's)")
    group.add_argument("--mem-gb", type=float, help="memory per node in GB (default: the cluster's)")
    group.add_argument("--timeout-min", type=int, help="time limit of one allocation in minutes (default 240); "
                       "the job requeues itself before it and resumes")
    group.add_argument("--account", help="SLURM account")
    group.add_argument("--qos", help="SLURM quality of service")
    group.add_argument("--constraint", help="SLURM node constraint")
    group.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="any submitit SLURM parameter, passed as slurm_KEY (repeatable), e.g. exclusive=True")
    group.add_argument("--local", action="store_true", help="run with submitit's local executor on this machine")
    group.add_argument("--wait", action="store_true", help="block until the job(s) ended; exit 1 if one failed")
    return parser


def build_parser():
    from benchmark.run import build_parser as run_parser

    return CommandParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                   parents=[run_parser(), cluster_parser()], add_help=False)


# --- shared by slurm.launch and slurm.sweep -------------------------------------------------------------


def run_argv(argv, own_parser):
    """The ``benchmark.run`` part of ``argv`` without ``--out``: everything ``own_parser`` does not take."""
    split = CommandParser(add_help=False, parents=[own_parser])
    split.add_argument("--out")
    return split.parse_known_args(argv)[1]


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parameters_from_args(args, **extra):
    """submitit parameters of the parsed cluster options: `executor_parameters` with them (and ``extra``) applied."""
    free = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DataError(f"--slurm {item}: expected KEY=VALUE, e.g. --slurm exclusive=True")
        free[key if key.startswith("slurm_") else f"slurm_{key}"] = _literal(value.strip())
    return executor_parameters(
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb, timeout_min=args.timeout_min, slurm_partition=args.partition,
        slurm_account=args.account, slurm_qos=args.qos, slurm_constraint=args.constraint, **extra, **free,
    )


def check_config(gin_files, bindings):
    """Parse the gin files and bindings as ``benchmark.run`` will (a bad file or binding raises DataError);
    returns gin's text of the parsed config (equal texts: the same run)."""
    import gin

    from benchmark.run import parse_config

    with contextlib.redirect_stderr(io.StringIO()):  # the "no benchmark bound" notice is the job's to print
        parse_config(gin_files, bindings)
    return gin.config_str()


def submit_jobs(executor, argvs, workdir=None):
    """Submit one job (one argv) or a job array (several) of `BenchmarkJob` running in ``workdir`` (default:
    here); sbatch refusals become DataError."""
    from submitit.core.utils import FailedJobError

    try:
        if len(argvs) == 1:
            return [executor.submit(BenchmarkJob(workdir), argvs[0])]
        return executor.map_array(BenchmarkJob(workdir), argvs)
    except FailedJobError as err:
        raise DataError(f"sbatch refused the job: {' '.join(str(err).split())}") from None


def _describe(parameters, local):
    where = "local" if local else f"slurm, partition {parameters.get('slurm_partition')}"
    tasks, gpus = parameters.get("tasks_per_node", 1), parameters.get("gpus_per_node", 0)
    return f"{where}, {tasks} task{'s' * (tasks > 1)}, {gpus} GPU{'s' * (gpus != 1)}"


def _failure(job):
    """The exception a failed job ended with (the last line of its trace), or its state."""
    try:
        job.results()
    except Exception as err:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]  # submitit rules off the trace
        trace = lines[rules[0] + 1 : rules[1]] if len(rules) >= 2 else lines
        return trace[-1] if trace else type(err).__name__
    return None


# --- the command ----------------------------------------------------------------------------------------


def submit(argv):
    """Check and submit one job for the ``slurm.launch`` command line ``argv``.

    Returns:
        (job, run_dir, parameters): the submitit job, the absolute run directory (None when
        ``benchmark.run`` names it from the config hash), the submitit parameters used.

    Raises:
        DataError: a bad gin file or binding, an unknown partition or parameter, more GPUs or CPUs
            than a node has, or sbatch refused the job; nothing was submitted.
    """
    from benchmark.run import build_parser as run_parser
    from benchmark.run import run_bindings

    args = build_parser().parse_args(argv)
    forwarded = run_argv(argv, cluster_parser())
    run_args = run_parser().parse_args(forwarded)
    check_config(run_args.gin, run_bindings(run_args))
    run_dir = Path(args.out).absolute() if args.out else None
    if run_dir is not None:
        forwarded += ["--out", str(run_dir)]
    parameters = parameters_from_args(args, name=f"smat-bench:{run_dir.name}" if run_dir else None)
    if args.local:
        check_local_request(parameters)
    else:
        parameters["slurm_partition"] = check_request(parameters)
    folder = (run_dir or Path("runs").absolute()) / "submitit"
    executor = make_executor(folder, parameters, local=args.local)
    (job,) = submit_jobs(executor, [forwarded])
    return job, run_dir, parameters


def main(argv=None):
    """The CLI: submit, print the job id, run directory and log; with ``--wait``, wait for the job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG):
        job, run_dir, parameters = submit(argv)
    print(f"job {job.job_id} submitted ({_describe(parameters, args.local)})")
    print(f"run directory: {run_dir or 'runs/<method>-<benchmark>-<config hash> (named by the job; see the log)'}")
    print(f"log: {job.paths.stdout}")
    sys.stdout.flush()
    if args.wait:
        error = _failure(job)
        if error:
            print(f"job {job.job_id} failed: {error}\nlog: {job.paths.stdout}", file=sys.stderr)
            raise SystemExit(1)
        print(f"job {job.job_id} done: results in {job.results()[0]}")
    return job


if __name__ == "__main__":
    main()
