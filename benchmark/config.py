"""The run configuration: one gin-configurable root, bound as ``run.<field>`` in gin files.

It is the only place where gin injects run options (the method and adapter constructors are the
others); `benchmark.run` reads it after parsing the gin files and bindings.
"""

import dataclasses
import re

import gin

from benchmark.checks import FLAG, Rule, check, integer, number, one_of, optional, tuple_of
from benchmark.evaluate import DEFAULT_LR_GRID
from methods.adapters import ADAPTERS

__all__ = ["RunConfig"]


@gin.configurable("run", module="benchmark")
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run does, bound in gin as ``run.<field>``.

    Attributes:
        method: a registered method name (``smat``, ``pmf``, ...); set by ``methods/<name>.gin``.
        benchmark: a benchmark of ``registry/benchmarks.toml``; None runs the embedded mini benchmark.
        records_root: converted records (else ``$SMAT_BENCH_RECORDS``); unused by ``md_mini``.
        decoded_cache: a directory built by ``python -m benchmark.cache build`` for this benchmark, read
            instead of decoding records; None reads and decodes records.
        backbone: timm model name; ``weights_file`` a local checkpoint for it.
        pretrain_steps: >0 pre-trains a backbone without hub weights on the benchmark's pretrain
            sources first (cached), as ``md_mini`` does for its tiny ViT.
        train_episodes: meta-training episodes; meta-updates = train_episodes / method.tasks_per_step.
        valid_every, checkpoint_every: meta-updates between validations / checkpoints.
        seed: seed of the meta-training episode stream and of torch.
        adapters: meta-test adapters (``--adapt`` overrides).
        lr_grid, search_episodes: the fine-tuning lr search of `benchmark.evaluate`.
        test_episodes: test episodes per source (None: the benchmark's).
        workers: DataLoader processes decoding episodes.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        smoke: a tiny version of the same job (rows marked, ignored by leaderboards).
    """

    method: str = gin.REQUIRED
    benchmark: str | None = None
    records_root: str | None = None
    decoded_cache: str | None = None
    backbone: str = "vit_small_patch16_224.dino"
    weights_file: str | None = None
    pretrain_steps: int = 0
    train_episodes: int = 50_000
    valid_every: int = 500
    checkpoint_every: int = 100
    seed: int = 0
    adapters: tuple = ("protonet",)
    lr_grid: tuple = DEFAULT_LR_GRID
    search_episodes: int = 5
    test_episodes: int | None = None
    workers: int = 2
    device: str = "auto"
    smoke: bool = False

    def __post_init__(self):
        """Refuse values no run can use, naming the binding (`benchmark.checks`)."""
        check("run", vars(self), RULES)


RULES = dict(  # the range of each field of `RunConfig`
    pretrain_steps=integer(0), train_episodes=integer(0), valid_every=integer(1), checkpoint_every=integer(1),
    seed=integer(0), adapters=tuple_of(one_of(*ADAPTERS)), lr_grid=tuple_of(number(0)), search_episodes=integer(1),
    test_episodes=optional(integer(1)), workers=integer(0),
    device=Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    smoke=FLAG,
)
