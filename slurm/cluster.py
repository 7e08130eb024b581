"""Cluster defaults, the executor, and what the cluster offers (partitions, CPUs and GPUs per node).

The defaults live in one function, `executor_parameters`, and the caller's overrides are applied last
(as dinov2's ``get_slurm_executor_parameters``). Names are submitit's: generic ones are plain
(``timeout_min``, ``gpus_per_node``), SLURM-only ones carry the ``slurm_`` prefix; ``None`` means "not
set". `check_request` asks the cluster (``sinfo``) whether a request can ever run, so a bad partition or
too many GPUs is refused before anything is submitted.

Example:
    >>> params = executor_parameters(gpus_per_node=2, slurm_partition="debug")
    >>> params["tasks_per_node"], params["slurm_signal_delay_s"]
    (2, 120)
    >>> executor = make_executor("runs/submitit", params)      # doctest: +SKIP
"""

import os
import re
import shlex
import shutil
import subprocess

from registry.errors import DataError

__all__ = ["executor_parameters", "make_executor", "check_request", "check_local_request", "partitions", "EXPORTED_ENV"]

MAX_NUM_TIMEOUT = 30  # requeues after a time-out (preemptions are not counted), as dinov2
EXPORTED_ENV = ("SMAT_BENCH_CACHE", "SMAT_BENCH_RECORDS")  # exported into every job when set here
_CONSTRUCTOR_ONLY = ("slurm_max_num_timeout", "slurm_python", "local_max_num_timeout", "local_python")


def executor_parameters(**overrides):
    """The cluster defaults for one ``benchmark.run`` job, then ``overrides`` (``None`` values are ignored).

    Defaults: one node; ``tasks_per_node`` = ``gpus_per_node`` (one process per GPU, torch.distributed
    across them) or 1; 4 h per allocation, requeued up to 30 times after a time-out; SIGUSR2 120 s
    before the end (submitit's preemption signal: the job requeues itself and the run resumes from its
    directory); the job name ``smat-bench``. The environment the job needs is not among them: `make_executor`
    exports it (``EXPORTED_ENV``), so parameters saved and reused later never carry a stale one.

    Returns:
        a dict of submitit parameters (``AutoExecutor`` names; see `make_executor`).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    gpus = overrides.get("gpus_per_node") or None  # 0 means none: never write --gpus-per-node=0
    params = dict(
        name="smat-bench",
        nodes=1,
        timeout_min=4 * 60,
        gpus_per_node=gpus,
        tasks_per_node=gpus or 1,
        slurm_signal_delay_s=120,
        slurm_max_num_timeout=MAX_NUM_TIMEOUT,
    )
    params.update(overrides)
    params["gpus_per_node"] = params["gpus_per_node"] or None
    return {k: v for k, v in params.items() if v is not None}


def make_executor(folder, parameters, local=False):
    """A submitit ``AutoExecutor`` (``local``: subprocesses on this machine) with ``parameters``.

    A SLURM job exports ``SMAT_BENCH_CACHE`` / ``SMAT_BENCH_RECORDS`` as set here and now: the ``export`` lines
    come after the ``slurm_setup`` lines of ``parameters``, so they win over any older ones there.

    Raises:
        DataError: an unknown parameter (with submitit's list of the valid ones), a ``slurm_setup`` that is
            not a list of lines, or no SLURM here.
    """
    import submitit

    parameters = dict(parameters)
    constructor = {k: parameters.pop(k) for k in _CONSTRUCTOR_ONLY if k in parameters}
    if not local:
        if shutil.which("sbatch") is None:
            raise DataError("sbatch not found: this machine is not a SLURM submit host; pass --local to run here")
        setup = parameters.get("slurm_setup") or []
        if not isinstance(setup, (list, tuple)):
            raise DataError(f"--slurm setup={setup!r}: expected a list of shell lines, "
                            "e.g. --slurm \"setup=['module load cuda']\"")
        exports = [f"export {k}={shlex.quote(os.environ[k])}" for k in EXPORTED_ENV if os.environ.get(k)]
        if setup or exports:
            parameters["slurm_setup"] = [*setup, *exports]
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="local" if local else "slurm", **constructor)
        executor.update_parameters(**parameters)
    except (NameError, AssertionError, ValueError) as err:
        lines = [line for line in str(err).splitlines() if not line.startswith(("Known executors", "As a reminder"))]
        raise DataError(f"submitit: {' '.join(' '.join(lines).split())}") from None
    return executor


# --- what the cluster offers --------------------------------------------------------------------------


def _sinfo(*fields):
    if shutil.which("sinfo") is None:
        raise DataError("sinfo not found: this machine is not a SLURM submit host; pass --local to run here")
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "|".join(fields)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise DataError(f"sinfo failed: {' '.join(result.stderr.split()) or result.returncode}")
    return [line.split("|") for line in result.stdout.splitlines() if line.strip()]


def _gpus(gres):
    """GPUs in a node's GRES string (``gpu:2``, ``gpu:a100:8(S:0-1)``, ``(null)``)."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def partitions():
    """{partition: {"default": bool, "nodes": {node: {"cpus": int, "gpus": int, "gres": str}}}} from ``sinfo``."""
    found = {}
    for partition, node, cpus, gres in _sinfo("%P", "%N", "%c", "%G"):
        name = partition.rstrip("*")
        entry = found.setdefault(name, dict(default=partition.endswith("*"), nodes={}))
        entry["nodes"][node] = dict(cpus=int(cpus), gpus=_gpus(gres), gres=gres)
    return found


def check_request(parameters):
    """Refuse, before submission, a request no node of its partition can ever run; return the partition.

    Checks the partition exists (the cluster's default when none is given), and that one node has
    ``gpus_per_node`` GPUs and ``cpus_per_task`` × ``tasks_per_node`` CPUs.

    Raises:
        DataError: naming what was asked, what the partition's nodes have, and the fix.
    """
    available = partitions()
    partition = parameters.get("slurm_partition")
    if partition is None:
        partition = next((name for name, p in available.items() if p["default"]), None)
        if partition is None:
            raise DataError(f"no default partition on this cluster; pass --partition ({', '.join(available)})")
    if partition not in available:
        names = ", ".join(f"{n} (default)" if p["default"] else n for n, p in available.items())
        raise DataError(f"--partition {partition}: no such partition on this cluster; partitions: {names}")
    nodes = available[partition]["nodes"]
    listing = ", ".join(f"{n}: {v['cpus']} CPUs, {v['gpus']} GPUs" for n, v in sorted(nodes.items()))
    gpus = parameters.get("gpus_per_node") or 0
    cpus = (parameters.get("cpus_per_task") or 1) * (parameters.get("tasks_per_node") or 1)
    fitting = [v["cpus"] for v in nodes.values() if v["gpus"] >= gpus]  # the CPUs of the nodes with enough GPUs
    if fitting and max(fitting) >= cpus:
        return partition
    if not fitting:
        fix = f"ask for at most {max(v['gpus'] for v in nodes.values())} GPUs"
    elif gpus:
        fix = (f"lower --cpus-per-task or --gpus-per-node (its nodes with {gpus} or more GPUs have at most "
               f"{max(fitting)} CPUs)")
    else:
        fix = f"lower --cpus-per-task (its nodes have at most {max(fitting)} CPUs)"
    raise DataError(f"{gpus} GPUs and {cpus} CPUs on one node (--gpus-per-node; --cpus-per-task × tasks per node): "
                    f"partition {partition} has no node with both ({listing}); {fix}, or choose another --partition")


def check_local_request(parameters):
    """Refuse, before a ``--local`` run, more GPUs than this machine has: the tasks past its last GPU would fail
    and the others wait for them. A machine without CUDA runs the tasks on the CPU (gloo), any number of them.

    Raises:
        DataError: naming the GPUs asked for and those here, and the fix.
    """
    import torch

    gpus, here = parameters.get("gpus_per_node") or 0, torch.cuda.device_count()
    if here and gpus > here:
        raise DataError(f"--gpus-per-node {gpus} --local: this machine has {here} GPU(s); ask for at most {here} "
                        "(more processes on the CPU: --tasks-per-node N --bind \"run.device = 'cpu'\")")
