"""Declarations of the data: sources, benchmarks, dataset specs and the official episode sampler.

Imports numpy and the standard library only (no torch), so its command-line tools start fast.
"""

from registry.catalog import Benchmark, Source, get_benchmark, get_source, list_benchmarks, list_sources
from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import Split, load_dataset_spec
from registry.errors import DataError
from registry.sampling import EpisodeDescriptionSampler

__all__ = [
    "Benchmark",
    "DataError",
    "EpisodeDescriptionConfig",
    "EpisodeDescriptionSampler",
    "Source",
    "Split",
    "get_benchmark",
    "get_source",
    "list_benchmarks",
    "list_sources",
    "load_dataset_spec",
]
