"""SLURM launchers for ``benchmark.run``, through submitit: one job (``python -m slurm.launch``) or a grid as one
job array (``python -m slurm.sweep``).

The launchers stay thin: the job (`BenchmarkJob`) is a small callable around ``benchmark.run``'s
``execute`` that requeues itself on time-out or preemption, and all of a run's state lives in its run
directory; cluster defaults live in one function (`executor_parameters`).
"""

from slurm.cluster import check_request, executor_parameters, make_executor
from slurm.job import BenchmarkJob

__all__ = ["BenchmarkJob", "executor_parameters", "make_executor", "check_request"]
