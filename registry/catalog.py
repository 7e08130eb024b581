"""The declarative registry: sources (``sources.toml``) and benchmarks (``benchmarks.toml``).

Declarations are data, read with the standard library's ``tomllib`` and validated here; every error
names the file and the key and says what is valid. A source's declared class counts are checked
against the user's ``dataset_spec.json`` when its records are opened (`Source.load_spec`).

Example:
    >>> bench = get_benchmark("md_paper")
    >>> [s.name for s in bench.test_sources][:2]
    ['ilsvrc_2012', 'omniglot']
    >>> get_source("fungi").classes["test"]
    200
"""

import difflib
import fnmatch
import os
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import (
    BiLevelDatasetSpecification,
    DatasetSpecification,
    HierarchicalDatasetSpecification,
    Split,
    load_dataset_spec,
)
from registry.errors import DataError

__all__ = [
    "Source",
    "Benchmark",
    "get_source",
    "list_sources",
    "get_benchmark",
    "list_benchmarks",
    "resolve_records_root",
    "RECORDS_ENV",
]

SOURCES_FILE = Path(__file__).with_name("sources.toml")
BENCHMARKS_FILE = Path(__file__).with_name("benchmarks.toml")
RECORDS_ENV = "SMAT_BENCH_RECORDS"

ROLES = ("id", "ood", "pretrain")
SPEC_KINDS = {
    "flat": DatasetSpecification,
    "bilevel": BiLevelDatasetSpecification,
    "dag": HierarchicalDatasetSpecification,
}
RESIZES = ("center_crop", "squash")
NORMALIZATIONS = ("imagenet", "unit_range")
CONVERTERS = ("official", "smat-bench", "generated")
PREPROCESSINGS = ("paper", "official")
RECORDS_KINDS = ("user", "mini")


def _unknown(kind, name, choices, where):
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"choose one of {', '.join(choices)}"
    return DataError(f"{where}: unknown {kind} {name!r}; {hint}")


def _check_choice(value, choices, where):
    if value not in choices:
        raise DataError(f"{where} is {value!r}; choose one of {', '.join(choices)}")
    return value


def _check_keys(entry, allowed, where):
    extra = sorted(set(entry) - set(allowed))
    if extra:
        raise DataError(f"{where}: unknown key(s) {extra}; valid keys: {', '.join(sorted(allowed))}")


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; reinstall smat-bench") from None
    except tomllib.TOMLDecodeError as err:
        raise DataError(f"{path}: invalid TOML ({err})") from None


@dataclass(frozen=True)
class Source:
    """One declared source. See ``sources.toml`` for the meaning of each field."""

    name: str
    role: str
    ontology: str
    classes: dict
    image_size: int
    resize: str
    normalization: str
    converter: str
    description: str = ""

    def splits(self):
        """Splits that have classes, in TRAIN, VALID, TEST order."""
        return [s for s in Split if self.classes[s.value.lower()] > 0]

    def how_to_fix(self):
        """What to do when this source's records are missing or wrong."""
        if self.converter == "official":
            return f"re-run the official Meta-Dataset conversion for {self.name}"
        if self.converter == "smat-bench":
            return f"run `python -m registry.convert {self.name} --raw RAW_DIR --out RECORDS_ROOT`"
        return f"delete the directory and let smat-bench regenerate it (`python -m registry.mini --out DIR`)"

    def load_spec(self, records_root):
        """The spec of ``records_root/<name>``, checked against this declaration.

        Raises:
            DataError: the spec is missing, of another kind, or has other class counts per split.
        """
        directory = Path(records_root) / self.name
        try:
            spec = load_dataset_spec(directory)
        except DataError as err:
            raise DataError(f"source '{self.name}': {err}; {self.how_to_fix()}") from None
        expected_kind = SPEC_KINDS[self.ontology]
        if not isinstance(spec, expected_kind):
            raise DataError(
                f"{SOURCES_FILE.name}: source '{self.name}' is declared {self.ontology} "
                f"({expected_kind.__name__}), but {directory}/dataset_spec.json is a {type(spec).__name__}; "
                f"{self.how_to_fix()}"
            )
        for split in Split:
            want, have = self.classes[split.value.lower()], spec.classes_per_split[split]
            if want != have:
                raise DataError(
                    f"{SOURCES_FILE.name}: source '{self.name}' expects {want} {split.value.lower()} classes, "
                    f"{directory}/dataset_spec.json has {have}; {self.how_to_fix()} or point the records root "
                    "at the converted records"
                )
        return spec


@dataclass(frozen=True)
class Benchmark:
    """One declared benchmark. See ``benchmarks.toml`` for the meaning of each field."""

    name: str
    description: str
    records: str
    train_sources: tuple
    valid_sources: tuple
    test_sources: tuple
    pretrain_sources: tuple
    valid_episodes: int
    test_episodes: int
    seed: int
    preprocessing: str
    episode_config: dict = field(default_factory=dict)
    train_episode_config: dict = field(default_factory=dict)
    eval_episode_config: dict = field(default_factory=dict)

    def config_for(self, split):
        """The `EpisodeDescriptionConfig` of episodes of ``split`` (TRAIN = meta-training)."""
        scoped = self.train_episode_config if Split.parse(split) is Split.TRAIN else self.eval_episode_config
        return EpisodeDescriptionConfig(**{**self.episode_config, **scoped})

    @property
    def sources(self):
        """Every source the benchmark uses, each once, in declaration order."""
        seen = {}
        for s in self.train_sources + self.valid_sources + self.test_sources + self.pretrain_sources:
            seen.setdefault(s.name, s)
        return tuple(seen.values())


_SOURCE_KEYS = {f for f in Source.__dataclass_fields__ if f != "name"}
_BENCHMARK_KEYS = {f for f in Benchmark.__dataclass_fields__ if f != "name"} | {"extends"}


def _parse_source(name, entry, defaults, where):
    _check_keys(entry, _SOURCE_KEYS, where)
    merged = {**defaults, **entry}
    missing = sorted(_SOURCE_KEYS - {"description"} - set(merged))
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    classes = merged["classes"]
    if not isinstance(classes, dict) or set(classes) != {"train", "valid", "test"}:
        raise DataError(f"{where}.classes must be {{ train = N, valid = N, test = N }}, got {classes!r}")
    if any(not isinstance(n, int) or n < 0 for n in classes.values()):
        raise DataError(f"{where}.classes must hold non-negative integers, got {classes!r}")
    if not isinstance(merged["image_size"], int) or merged["image_size"] < 1:
        raise DataError(f"{where}.image_size must be a positive integer, got {merged['image_size']!r}")
    _check_choice(merged["role"], ROLES, f"{where}.role")
    _check_choice(merged["ontology"], tuple(SPEC_KINDS), f"{where}.ontology")
    _check_choice(merged["resize"], RESIZES, f"{where}.resize")
    _check_choice(merged["normalization"], NORMALIZATIONS, f"{where}.normalization")
    _check_choice(merged["converter"], CONVERTERS, f"{where}.converter")
    return Source(name=name, **merged)


@cache
def _sources():
    data = _read_toml(SOURCES_FILE)
    defaults = data.pop("defaults", {})
    _check_keys(defaults, _SOURCE_KEYS, f"{SOURCES_FILE.name}: [defaults]")
    return {
        name: _parse_source(name, entry, defaults, f"{SOURCES_FILE.name}: [{name}]")
        for name, entry in data.items()
    }


def _episode_config(overrides, where):
    try:
        EpisodeDescriptionConfig(**overrides)
    except TypeError:
        valid = ", ".join(EpisodeDescriptionConfig.field_names())
        raise DataError(f"{where}: unknown field in {sorted(overrides)}; valid fields: {valid}") from None
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    return dict(overrides)


def _parse_benchmark(name, data, defaults, where, chain=()):
    entry = data[name]
    _check_keys(entry, _BENCHMARK_KEYS, where)
    if "extends" in entry:
        parent = entry["extends"]
        if parent not in data or parent in chain:
            raise _unknown("benchmark to extend", parent, [b for b in data if b != name], f"{where}.extends")
        base = _parse_benchmark(parent, data, defaults, f"{BENCHMARKS_FILE.name}: [{parent}]", chain + (name,))
        merged = {**_raw(base), **{k: v for k, v in entry.items() if k != "extends"}}
    else:
        merged = {**defaults, **entry}
    missing = sorted(_BENCHMARK_KEYS - {"extends", "episode_config", "train_episode_config", "eval_episode_config"} - set(merged))
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    for key in ("train_sources", "valid_sources", "test_sources", "pretrain_sources"):
        merged[key] = _resolve_sources(merged[key], f"{where}.{key}")
    for key in ("episode_config", "train_episode_config", "eval_episode_config"):
        merged[key] = _episode_config(merged.get(key, {}), f"{where}.{key}")
    for key in ("valid_episodes", "test_episodes", "seed"):
        if not isinstance(merged[key], int) or merged[key] < 0:
            raise DataError(f"{where}.{key} must be a non-negative integer, got {merged[key]!r}")
    _check_choice(merged["records"], RECORDS_KINDS, f"{where}.records")
    _check_choice(merged["preprocessing"], PREPROCESSINGS, f"{where}.preprocessing")
    return Benchmark(name=name, **merged)


def _raw(benchmark):
    """A benchmark back as declaration values (source names), for `extends`."""
    values = {k: getattr(benchmark, k) for k in Benchmark.__dataclass_fields__ if k != "name"}
    for key in ("train_sources", "valid_sources", "test_sources", "pretrain_sources"):
        values[key] = [s.name for s in values[key]]
    return values


def _resolve_sources(names, where):
    sources = _sources()
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise _unknown("source", unknown[0], list(sources), where)
    return tuple(sources[n] for n in names)


@cache
def _benchmarks():
    data = _read_toml(BENCHMARKS_FILE)
    defaults = data.pop("defaults", {})
    return {name: _parse_benchmark(name, data, defaults, f"{BENCHMARKS_FILE.name}: [{name}]") for name in data}


def get_source(name):
    """The declared `Source` called ``name``; an unknown name lists the close matches."""
    sources = _sources()
    if name not in sources:
        raise _unknown("source", name, list(sources), SOURCES_FILE.name)
    return sources[name]


def list_sources(pattern="*", role=None):
    """Names of declared sources matching an fnmatch ``pattern`` (and ``role``), in file order."""
    return [n for n, s in _sources().items() if fnmatch.fnmatch(n, pattern) and role in (None, s.role)]


def get_benchmark(name):
    """The declared `Benchmark` called ``name``; an unknown name lists the close matches."""
    benchmarks = _benchmarks()
    if name not in benchmarks:
        raise _unknown("benchmark", name, list(benchmarks), BENCHMARKS_FILE.name)
    return benchmarks[name]


def list_benchmarks(pattern="*"):
    """Names of declared benchmarks matching an fnmatch ``pattern``, in file order."""
    return [n for n in _benchmarks() if fnmatch.fnmatch(n, pattern)]


def resolve_records_root(benchmark, records_root=None):
    """Directory holding ``<source>/dataset_spec.json`` for ``benchmark``.

    ``records = "mini"``: the embedded mini benchmark, generated into the cache on first use.
    ``records = "user"``: ``records_root`` if given (the gin binding), else ``$SMAT_BENCH_RECORDS``.

    Raises:
        DataError: a user benchmark with no records root, or a root that is not a directory.
    """
    if benchmark.records == "mini":
        from registry.mini import ensure_mini

        return ensure_mini(records_root)
    root = records_root or os.environ.get(RECORDS_ENV)
    if not root:
        raise DataError(
            f"benchmark '{benchmark.name}' reads converted records, but no records root is set; "
            f"bind `records_root = '/path/to/records'` in gin or export {RECORDS_ENV}=/path/to/records"
        )
    if not Path(root).is_dir():
        raise DataError(f"records root {root} is not a directory; fix the gin binding or {RECORDS_ENV}")
    return Path(root)
