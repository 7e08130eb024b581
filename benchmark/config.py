"""The run configuration: one gin-configurable root, bound as ``run.<field>`` in gin files.

It is the only place where gin injects run options (the method and adapter constructors are the
others); `benchmark.run` reads it after parsing the gin files and bindings.
"""

import dataclasses
import re

import gin

from benchmark.evaluate import DEFAULT_LR_GRID

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
        """Refuse values no run can use, naming the binding (``ValueError``: the runner's one-line gin error)."""
        minimum = dict(pretrain_steps=0, train_episodes=0, valid_every=1, checkpoint_every=1, seed=0,
                       search_episodes=1, test_episodes=1, workers=0)
        for name, low in minimum.items():
            value = getattr(self, name)
            if value is None and name == "test_episodes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"run.{name} = {value!r}: give an integer >= {low}")
        if not self.lr_grid or not all(isinstance(lr, (int, float)) and lr >= 0 for lr in self.lr_grid):
            raise ValueError(f"run.lr_grid = {self.lr_grid!r}: give a tuple of learning rates >= 0 (0: no fine-tuning)")
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"run.device = {self.device!r}: give 'auto', 'cpu', 'cuda' or 'cuda:N'")
