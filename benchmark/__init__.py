"""The engine: records, episodes, preprocessing, and (in later stages) the train/eval loops and leaderboards.

Exports are loaded on first use, so that ``python -m benchmark.records`` does not pay for torch.
"""

import importlib

__all__ = ["BenchmarkData", "Episode", "EpisodeId", "Preprocess", "RecordFile", "decode_image"]

_HOME = {
    "BenchmarkData": "benchmark.episodes",
    "Episode": "benchmark.episodes",
    "EpisodeId": "benchmark.episodes",
    "Preprocess": "benchmark.preprocess",
    "RecordFile": "benchmark.records",
    "decode_image": "benchmark.records",
}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'benchmark' has no attribute {name!r}")
