"""The submitit job: one ``python -m benchmark.run`` invocation, requeued on time-out or preemption.

All of a run's state lives in its run directory, so the job pickles nothing but its command line and
the directory it runs in: on SIGUSR2 (SLURM's warning before the time limit, or a preemption) submitit
calls `checkpoint`, which returns a fresh job with the same arguments; the requeued job runs the same
command, and ``benchmark.run`` resumes training from ``RUN_DIR/checkpoints/last.pt`` and evaluation
from the first missing row of ``RUN_DIR/episodes.jsonl``. (dinov2's ``run/train/train.py``
``Trainer`` is the model.)
"""

import os
import sys

import submitit

__all__ = ["BenchmarkJob"]


class BenchmarkJob:
    """``BenchmarkJob()(argv)`` runs ``benchmark.run`` with ``argv`` inside a submitit job; returns the run directory.

    With several tasks (``tasks_per_node`` > 1, e.g. one per GPU) every task runs the same command and
    joins one torch.distributed group: the job exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` (submitit's ``TorchDistributedEnvironment``; every task keeps all
    of the node's GPUs visible and uses ``cuda:LOCAL_RANK``). ``OMP_NUM_THREADS`` defaults to the
    CPUs SLURM gave the task. The job runs in ``workdir`` (default: the directory it was created in), so
    relative paths in ``argv`` (gin files, bound paths) mean what they meant where it was submitted, also
    when a sweep's points are resubmitted from elsewhere.

    Example:
        >>> executor.submit(BenchmarkJob(), ["--gin", "methods/smat.gin", "--out", "/runs/smat"])  # doctest: +SKIP
    """

    workdir = None  # what a job pickled before jobs had a directory unpickles to: it runs where it starts

    def __init__(self, workdir=None):
        self.workdir = os.path.abspath(workdir or os.getcwd())

    def __call__(self, argv):
        argv = list(argv)
        if self.workdir:
            os.chdir(self.workdir)
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            os.environ.setdefault("OMP_NUM_THREADS", os.environ["SLURM_CPUS_PER_TASK"])  # before torch is imported
        if os.environ.get("SUBMITIT_EXECUTOR"):
            env = submitit.JobEnvironment()
            print(f"smat-bench job: {env}; python -m benchmark.run {' '.join(argv)}", file=sys.stderr, flush=True)
            if env.num_tasks > 1:
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from benchmark.run import build_parser, execute  # lazily: the pickled job stays importable without torch

        return str(execute(build_parser().parse_args(argv)))

    def checkpoint(self, argv):
        """A fresh job with the same command: the run resumes from its directory, nothing else is kept."""
        return submitit.helpers.DelayedSubmission(BenchmarkJob(self.workdir), argv)

    def __repr__(self):
        return f"BenchmarkJob({self.workdir!r})"
