"""``python -m benchmark.leaderboard``: result rows → Table 1–5-style markdown leaderboards (contract C4).

    python -m benchmark.leaderboard RUN_DIR [RUN_DIR ...] [--out results/] [--merge-runs] [--commands SCRIPT]

Reads every ``episodes.jsonl`` under the given directories (contract C3), ignores smoke rows, counts
the same (run_id, adaptation, source, split, seed, episode) once, and refuses, naming ``file:line``, a
row that is not one of its run's test episodes (the benchmark's test sources, split ``test``, its seed,
indices below its ``test_episodes`` or the run's ``run.test_episodes``), an accuracy outside [0, 1], a
negative or non-finite cost, repeats of one episode of one run with other accuracies, and rows of one
episode that saw other images (their ``episode_digest`` differ). It writes into ``--out``:

- ``table1.md`` / ``table3.md``: per test source (benchmark order), then ``ID Avg`` and ``OOD Avg`` (and
  Table 3's ``OOD Avg, the paper's 5 sources``, beside which its published OOD average stands); one
  column per method × adapter of ``md_paper`` with the DINO / Sup-21k ViT-S/16 backbone;
- ``table2.md``: SMAT's variants and PMF (ProtoNet): ID Avg, OOD Avg, Avg and the MLS/Meta/DT/IE switches;
- ``table4.md``: SMAT with each adapter on the sources where gradient-free or full-joint ran;
- ``table5.md``: SMAT's cost per adapter (seconds per task, peak GPU MiB, accuracy, device);
- ``{benchmark}__{backbone}.md``: every configuration Tables 1 and 3 do not hold (another method,
  variant, adapter, benchmark or backbone) in the Table 1 format, so that new runs appear without code
  changes and every column has its ID Avg and OOD Avg in some table (SMAT+gradient-free/full-joint,
  in Table 4 on its few sources, also here);
- ``paired.md``: SMAT minus each baseline on the episodes both evaluated;
- figures (`benchmark.figures`) and ``README.md``, the index: what each file holds and which runs
  made it, and what was skipped for lack of rows.

Statistics. A cell is ``mean ± CI`` in percent over a source's episodes, CI = 1.96 · std / √n with
std of ddof 0 (`benchmark.results.mean_ci`). An average (``ID Avg``, ``OOD Avg``, ``Avg``) is the mean
of per-source means; its CI, from independent sources, is √(Σ CI_s²) / k. A cell with fewer episodes
than the benchmark declares is marked ``*`` (an average, when one of its sources is); an average
over fewer sources than its row names is marked ``†``. The paper's numbers (``benchmark/data/``,
Tables 1–5 of Chen et al., ICML 2024) sit in their own ``(paper)`` column after the measured columns
of the same configuration; they have no CI.

Runs. A configuration is (benchmark, backbone, method, variant, adaptation). Each run (``run_id``)
of a configuration is its own column, labelled, when the configuration has several, with the bindings
their ``config.gin`` differ in (e.g. ``SMAT [num_experts=2, target_sparsity=0.5]``), else a short run id; ``--merge-runs`` makes one column of the runs of a configuration whose ``config.gin`` differ
at most in ``run.seed`` (a sweep's other points stay apart), its per-episode accuracy the mean over
those runs, so n still counts episodes. Output is deterministic: the same rows give byte-identical
files.
"""

import ast
import hashlib
import math
import re
import statistics
from dataclasses import dataclass, field
from functools import cache, cached_property
from itertools import groupby
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from scipy.stats import wilcoxon
from tabulate import tabulate

from benchmark.results import ROW_KEYS, mean_ci, read_jsonl
from registry.catalog import get_benchmark
from registry.errors import CommandParser, DataError, exit_on_error

__all__ = ["main", "write_results", "load_results", "render_tables", "render_readme", "Results", "Series",
           "Product", "Cell", "average_cell", "published_accuracy"]

PROG = "python -m benchmark.leaderboard"
DATA = Path(__file__).with_name("data")

CONFIG_KEYS = ("benchmark", "backbone", "method", "variant", "adaptation")
EPISODE_KEYS = ("source", "split", "seed", "episode")
DEDUP_KEYS = ("run_id", "adaptation", *EPISODE_KEYS)
OPTIONAL_KEYS = ("device", "routing_weights", "episode_digest")
NUMBERS = {"seed": int, "episode": int, "accuracy": (int, float), "seconds": (int, float, type(None)),
           "peak_memory_mib": (int, float, type(None))}  # the numeric keys of a row and their types

METHODS = {"pre": "Pre", "pmf": "PMF", "softmerge": "SoftMerge", "smat": "SMAT"}  # table order and paper names
ADAPTERS = {"protonet": "", "full": "+full", "lora": "+LoRA", "gradient_free": "+gradient-free",
            "full_joint": "+full-joint"}  # table order and the paper's suffix (ProtoNet has none)

PAPER_BENCHMARK = "md_paper"
DINO = "vit_small_patch16_224.dino"
SUP21K = "vit_small_patch16_224.augreg_in21k"
PAPER_BACKBONES = {"dino_vits16": DINO, "sup21k_vits16": SUP21K}
PAPER_ROWS = {  # published dataset name → our source or average row
    "ImageNet": "ilsvrc_2012", "Omniglot": "omniglot", "Aircraft": "aircraft", "CUB": "cu_birds", "DTD": "dtd",
    "Quickdraw": "quickdraw", "Fungi": "fungi", "VGGFlower": "vgg_flower", "TrafficSig": "traffic_sign",
    "MSCOCO": "mscoco", "Cifar10": "cifar10", "Cifar100": "cifar100", "MNIST": "mnist", "Sketch": "sketch",
    "Pet": "pet", "Clipart": "clipart", "Food": "food", "Cars": "cars",
    "ID Avg": "ID Avg", "Avg ID": "ID Avg", "OOD Avg": "OOD Avg", "Avg OOD": "OOD Avg",
}
TABLE4_LABELS = {"protonet": "SMAT (ProtoNet)", "gradient_free": "SMAT+gradient-free (Alg.2)",
                 "full": "SMAT+full (Alg.3)", "full_joint": "SMAT+full-joint"}
TABLE5_LABELS = {"protonet": "w/o fine-tuning (ProtoNet)",
                 "gradient_free": "Alg.2 gradient-free expert selection (50 steps)",
                 "full": "Alg.3 gradient-based full fine-tuning (50 steps)"}
TABLE2_SWITCHES = {  # (method, variant) → (MLS, Meta, DT, IE), in the paper's row order
    ("smat", "default"): (True, True, True, True),
    ("smat", "no_dense_teacher"): (True, True, False, True),
    ("smat", "no_interpolated_experts"): (True, True, True, False),
    ("smat", "no_meta_split"): (True, False, True, True),
    ("smat", "mlp_experts"): (False, True, True, False),
    ("pmf", "default"): (False, False, False, False),
}
TABLE4_ADAPTERS = ("gradient_free", "full_joint")  # the adapters that make a source a Table 4 row


@dataclass(frozen=True)
class PaperTable:
    """A per-source method × adapter table of the paper (Table 1 or 3) and the runs that fill it."""

    name: str
    title: str
    backbone: str
    methods: tuple = tuple(METHODS)
    adaptations: tuple = ("protonet", "full", "lora")

    def holds(self, series):
        return (series.benchmark == PAPER_BENCHMARK and series.backbone == self.backbone and series.variant == "default"
                and series.method in self.methods and series.adaptation in self.adaptations)


TABLE1 = PaperTable("table1", "Table 1 — Meta-Dataset + 10 OOD sets, DINO ViT-S/16", DINO)
TABLE3 = PaperTable("table3", "Table 3 — Meta-Dataset + 10 OOD sets, Sup-21k ViT-S/16", SUP21K)


# --- reading -----------------------------------------------------------------------------------------


def find_episode_files(paths):
    """Every ``episodes.jsonl`` under ``paths``, sorted; a missing path or one without any is a `DataError`."""
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            problem = "not a directory" if path.exists() else "no such directory"
            raise DataError(f"{path}: {problem}; pass run directories made by python -m benchmark.run")
        found = sorted(path.rglob("episodes.jsonl"))
        if not found:
            raise DataError(f"{path}: no episodes.jsonl under it; pass directories made by python -m benchmark.run")
        files += found
    return sorted(dict.fromkeys(f.resolve() for f in files))


def read_rows(path):
    """[(line number, row)] of one ``episodes.jsonl``; an unfinished last line (a write in flight) is left out.

    Raises:
        DataError: naming ``path:line`` for an unreadable file, a line that is not a JSON object, a
            row without a contract-C3 key, or one whose numbers are not what they measure (`number_problems`).
    """
    rows = []
    for number, row in read_jsonl(path, "the file is corrupt: remove that line (python -m benchmark.run on its run "
                                        "directory evaluates its episode again)"):
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise DataError(f"{path}:{number}: a result row lacks {', '.join(missing)} (contract C3)")
        wrong = [f"{key} = {row[key]!r}" for key, kind in NUMBERS.items()
                 if isinstance(row[key], bool) or not isinstance(row[key], kind)]
        if wrong:
            raise DataError(f"{path}:{number}: {', '.join(wrong)}: not the number a result row holds (contract C3)")
        problems = number_problems(row)
        if problems:
            raise DataError(f"{path}:{number}: {'; '.join(problems)} (contract C3): the row is corrupt; remove it "
                            "and evaluate that episode again (python -m benchmark.run on its run directory resumes)")
        rows.append((number, row))
    return rows


def number_problems(row):
    """What is wrong with a typed row's measurements: accuracy outside [0, 1] (NaN and ±inf included),
    seconds or peak memory negative or not finite."""
    problems = []
    if not 0 <= row["accuracy"] <= 1:
        problems.append(f"accuracy = {row['accuracy']!r} is not in [0, 1]")
    problems += [f"{key} = {row[key]!r} is not a finite number >= 0" for key in ("seconds", "peak_memory_mib")
                 if row[key] is not None and not 0 <= row[key] < math.inf]
    return problems


@cache
def benchmark_sources(name):
    """((source, role), ...) of benchmark ``name`` in table order, and its declared test episodes per source."""
    bench = get_benchmark(name)
    return tuple((s.name, s.role) for s in bench.test_sources), bench.test_episodes


def gin_value(text, name):
    """The value of the last ``name = value`` binding in an operative gin config, or None."""
    found = re.findall(rf"^{re.escape(name)}\s*=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    try:
        return ast.literal_eval(found[-1]) if found else None
    except (ValueError, SyntaxError):
        return None


def declared_episodes(run_dir, bench):
    """How many test episodes per source the run in ``run_dir`` evaluates: its ``run.test_episodes``
    (``config.gin``) where bound to a number, else benchmark ``bench``'s ``test_episodes``."""
    path = Path(run_dir) / "config.gin"
    bound = gin_value(path.read_text(), "run.test_episodes") if path.is_file() else None
    return bound if isinstance(bound, int) and not isinstance(bound, bool) else bench.test_episodes


def row_problem(row, bench, n):
    """Why ``row`` is not one of the test episodes its run evaluates on `Benchmark` ``bench``, or None.

    Those episodes (`benchmark.evaluate`) are the benchmark's test sources, split ``test``, the
    benchmark's seed and indices 0 .. ``n`` − 1 (`declared_episodes`): any other row is not an episode
    that every method is compared on.
    """
    sources = {s for s, _ in benchmark_sources(bench.name)[0]}
    where = f"registry/benchmarks.toml [{bench.name}]"
    if row["source"] not in sources:
        return f"source {row['source']!r} is not a test source of benchmark {bench.name!r} ({where})"
    if row["split"] != "test":
        return f"split {row['split']!r}: the leaderboard reads test episodes only, split 'test'"
    if row["seed"] != bench.seed:
        return f"seed {row['seed']}: the test episodes of {bench.name!r} have seed {bench.seed} ({where})"
    if not 0 <= row["episode"] < n:
        return (f"episode {row['episode']} is outside 0-{n - 1}, the test episodes of this run ({where} "
                "test_episodes, or run.test_episodes in its config.gin)")
    return None


def check_rows(path, rows):
    """Each of the numbered ``rows`` of ``path`` (`read_rows`) is a test episode its run evaluates: a
    registered benchmark (`get_benchmark`), then `row_problem`; else a `DataError` naming ``path:line``."""
    benchmarks = {}  # name → (Benchmark, the run's test episodes per source)
    for number, row in rows:
        if row["benchmark"] not in benchmarks:
            try:
                bench = get_benchmark(row["benchmark"])
            except DataError as err:
                raise DataError(f"{path}:{number}: {err}") from None
            benchmarks[bench.name] = bench, declared_episodes(path.parent, bench)
        problem = row_problem(row, *benchmarks[row["benchmark"]])
        if problem:
            raise DataError(f"{path}:{number}: {problem}; this row is not one of the episodes every method is "
                            "compared on: remove it (or the run) from the leaderboard's input")


@dataclass
class Results:
    """The rows the leaderboard reads: smoke rows dropped, repeated rows counted once.

    Attributes:
        rows: one row per (run_id, adaptation, source, split, seed, episode): C3 keys, ``device``,
            ``routing_weights``, ``episode_digest`` (None where absent).
        run_dirs: run_id → the directory of the first ``episodes.jsonl`` holding it (for
            ``config.gin`` and ``method_report.json``).
        smoke_rows, repeated_rows: how many rows were ignored as smoke or as repeats.
    """

    rows: pd.DataFrame
    run_dirs: dict
    smoke_rows: int = 0
    repeated_rows: int = 0

    def series(self, merge_runs=False):
        """The columns of every table: one `Series` per configuration and run (merged: per configuration
        and settings, `run_settings`)."""
        keys = [*CONFIG_KEYS, "settings" if merge_runs else "run_id"]
        found = [Series(*key[:5], rows=group) for key, group in self.rows.groupby(keys, sort=True)]
        for _, same in groupby(found, key=lambda s: s.config):
            same = list(same)
            if len(same) > 1:
                for series, label in zip(same, run_labels([s.run_ids[0] for s in same], self.run_dirs)):
                    series.run_label = label
        return found


def run_settings(run_dir):
    """A digest of the run's ``config.gin`` without its ``run.seed`` line: runs merged into one column
    must share it. None without a config.gin: such a run's settings are unknown, so it is merged with none."""
    path = Path(run_dir) / "config.gin"
    if not path.is_file():
        return None
    kept = [line for line in path.read_text().splitlines() if not re.match(r"\s*run\.seed\s*=", line)]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]


def load_results(paths):
    """`Results` from every ``episodes.jsonl`` under ``paths`` (sorted, so argument order does not matter)."""
    kept, run_dirs, smoke = [], {}, 0
    for path in find_episode_files(paths):
        rows = read_rows(path)
        fresh = [(number, r) for number, r in rows if not r.get("smoke", False)]
        smoke += len(rows) - len(fresh)
        check_rows(path, fresh)
        for number, row in fresh:
            run_dirs.setdefault(row["run_id"], path.parent)
            kept.append({**{key: row.get(key) for key in (*ROW_KEYS, *OPTIONAL_KEYS)}, "where": f"{path}:{number}"})
    frame = pd.DataFrame(kept, columns=[*ROW_KEYS, *OPTIONAL_KEYS, "where"])
    frame = frame.astype({"seed": "int64", "episode": "int64", "accuracy": "float64", "seconds": "float64",
                          "peak_memory_mib": "float64"})
    check_same_episodes(frame)  # before repeated rows are dropped: a copy of a run may have seen other images
    check_repeats(frame)
    unique = frame.drop_duplicates(subset=list(DEDUP_KEYS), keep="first").drop(columns="where").reset_index(drop=True)
    settings = {run_id: run_settings(directory) or f"run {run_id}" for run_id, directory in run_dirs.items()}
    unique["settings"] = unique["run_id"].map(settings)
    return Results(unique, run_dirs, smoke, len(frame) - len(unique))


def check_repeats(rows):
    """Rows repeating one episode of one run (`DEDUP_KEYS`, e.g. a copied run directory) agree on its
    accuracy, so counting the first is counting them all; otherwise a `DataError` names the first
    such row's place and a disagreeing one's (``where``: ``path:line``)."""
    keys = list(DEDUP_KEYS)
    differ = rows.groupby(keys, sort=False, dropna=False)["accuracy"].transform("nunique") > 1
    if not differ.any():
        return
    first = rows[differ].iloc[0]
    same = rows[differ & (rows[keys] == first[keys]).all(axis=1)]
    other = same[same["accuracy"] != first["accuracy"]].iloc[0]
    episode = ", ".join(f"{key} {first[key]}" for key in keys)
    raise DataError(f"{first['where']} and {other['where']}: two rows of one episode ({episode}) with accuracy "
                    f"{first['accuracy']:g} and {other['accuracy']:g}; remove the wrong one (or leave one copy of "
                    "the run out)")


def check_same_episodes(rows):
    """Rows of one episode (benchmark, source, split, seed, episode) carry one ``episode_digest`` (rows
    written before the digest existed are not checked): otherwise their runs (or two copies of one run)
    saw other images and their numbers are not comparable, which is a `DataError` naming the first such
    episode and its runs."""
    keys = ["benchmark", *EPISODE_KEYS]
    known = rows.dropna(subset=["episode_digest"])
    digests = known.groupby(keys, sort=True)["episode_digest"].nunique()
    clashes = digests[digests > 1]
    if clashes.empty:
        return
    first = known.set_index(keys).sort_index().loc[[clashes.index[0]]]
    seen = "; ".join(f"{digest} in {', '.join(sorted(group['run_id'].unique()))}"
                     for digest, group in first.groupby("episode_digest", sort=True))
    more = f", and so do {len(clashes) - 1} more episodes" if len(clashes) > 1 else ""
    raise DataError(
        f"episode {'/'.join(map(str, clashes.index[0]))} has other images in other rows ({seen}){more}: their "
        "records, benchmark settings or pixel path (the decoded cache rounds squash-resized pixels) differ, so "
        "their numbers are not comparable; leave out the runs of one side, or evaluate them again on the same records"
    )


def short_run_ids(run_ids):
    """Labels for runs shown side by side: each id's last ``-`` part (the config hash prefix), else the ids."""
    short = [run_id.rsplit("-", 1)[-1] for run_id in run_ids]
    return short if len(set(short)) == len(short) else list(run_ids)


def gin_bindings(run_dir):
    """{name: value text} of the one-line bindings of the run's ``config.gin`` ({} without one)."""
    path = Path(run_dir) / "config.gin"
    text = path.read_text() if path.is_file() else ""
    return dict(re.findall(r"^([\w.]+)\s*=\s*(\S.*?)\s*$", text, flags=re.MULTILINE))


def run_labels(run_ids, run_dirs):
    """Labels for runs of one configuration shown side by side: the bindings their ``config.gin`` differ in
    (``num_experts=2, target_sparsity=0.5``: the points of a sweep say which they are), else `short_run_ids`."""
    bindings = [gin_bindings(run_dirs[run_id]) for run_id in run_ids]
    names = sorted({name for b in bindings for name in b if len({b.get(name) for b in bindings}) > 1})
    labels = [", ".join(f"{name.rsplit('.', 1)[-1]}={b.get(name, '-')}" for name in names) for b in bindings]
    return labels if all(labels) and len(set(labels)) == len(labels) else short_run_ids(run_ids)


# --- statistics --------------------------------------------------------------------------------------


class Cell(NamedTuple):
    """A table cell in fractions: mean, 95% CI half-width, episodes, and its markers."""

    mean: float
    ci: float
    n: int
    incomplete: bool = False  # fewer episodes than the benchmark declares (on some source, for an average)
    partial: bool = False  # an average over fewer sources than its row names


def source_cell(values, expected):
    """`Cell` of one source's per-episode values; incomplete when fewer than ``expected``."""
    mean, ci = mean_ci(list(values))
    return Cell(mean, ci, len(values), len(values) < expected)


def average_cell(cells):
    """Mean of the present cells' means; CI √(Σ CI²)/k (independent sources); None when none is present."""
    present = [c for c in cells if c is not None]
    if not present:
        return None
    return Cell(statistics.fmean(c.mean for c in present), math.sqrt(sum(c.ci**2 for c in present)) / len(present),
                sum(c.n for c in present), any(c.incomplete for c in present), len(present) < len(cells))


def format_cell(cell, signed=False):
    """``mean ± CI`` in percent with two decimals, then ``*`` / ``†`` markers; ``—`` for no cell."""
    if cell is None:
        return "—"
    mean = f"{100 * cell.mean:+.2f}" if signed else f"{100 * cell.mean:.2f}"
    return f"{mean} ± {100 * cell.ci:.2f}{'*' if cell.incomplete else ''}{'†' if cell.partial else ''}"


def table_rows(benchmark, averages=("ID Avg", "OOD Avg")):
    """[(row name, sources it averages)] of a benchmark: each test source, then the requested averages."""
    sources, _ = benchmark_sources(benchmark)
    by_role = {"ID Avg": [s for s, r in sources if r == "id"], "OOD Avg": [s for s, r in sources if r == "ood"],
               "Avg": [s for s, _ in sources]}
    return [(s, (s,)) for s, _ in sources] + [(name, tuple(by_role[name])) for name in averages if by_role[name]]


@dataclass(eq=False)
class Series:
    """One column: a configuration's rows from one run (or, merged, from all its runs).

    ``episodes`` has one row per episode (source, split, seed, episode) with the mean over runs of
    accuracy, seconds and peak memory.
    """

    benchmark: str
    backbone: str
    method: str
    variant: str
    adaptation: str
    rows: pd.DataFrame = field(repr=False)
    run_label: str = ""

    @property
    def config(self):
        return self.benchmark, self.backbone, self.method, self.variant, self.adaptation

    @property
    def run_ids(self):
        return tuple(sorted(self.rows["run_id"].unique()))

    @property
    def name(self):
        """The paper's name of the configuration: ``SMAT+full``; a variant in parentheses."""
        variant = "" if self.variant == "default" else f" ({self.variant})"
        adapter = ADAPTERS.get(self.adaptation, f"+{self.adaptation}")
        return f"{METHODS.get(self.method, self.method)}{variant}{adapter}"

    @property
    def label(self):
        return f"{self.name} [{self.run_label}]" if self.run_label else self.name

    @property
    def sort_key(self):
        """Paper order: adapter, then method, then variant (default first), then run (numbers by value)."""
        return (_rank(self.adaptation, ADAPTERS), _rank(self.method, METHODS), self.variant != "default",
                self.variant, [(0, int(part), "") if part.isdigit() else (1, 0, part)
                               for part in re.split(r"(\d+)", self.run_label)])

    @cached_property
    def episodes(self):
        return (self.rows.groupby(list(EPISODE_KEYS), sort=True)[["accuracy", "seconds", "peak_memory_mib"]]
                .mean().reset_index())

    @cached_property
    def cells(self):
        """source → `Cell` of the per-episode accuracies."""
        expected = benchmark_sources(self.benchmark)[1]
        return {source: source_cell(group["accuracy"].tolist(), expected)
                for source, group in self.episodes.groupby("source", sort=True)}

    def cell(self, sources):
        """The `Cell` of one source, or the average over several."""
        return average_cell([self.cells.get(s) for s in sources])

    def column(self, rows):
        """{row name: formatted cell} for ``table_rows`` ``rows``."""
        return {name: format_cell(self.cell(sources)) for name, sources in rows}


def _rank(name, order):
    return (0, list(order).index(name), "") if name in order else (1, 0, name)


def sorted_series(series):
    return sorted(series, key=lambda s: s.sort_key)


# --- published numbers -------------------------------------------------------------------------------


@cache
def published_accuracy():
    """``benchmark/data/published_accuracy.csv`` keyed by (table, row, label): our row names, the paper's labels."""
    frame = pd.read_csv(DATA / "published_accuracy.csv")
    columns = frame[["table", "dataset", "method", "accuracy"]].itertuples(index=False)
    return {(table, PAPER_ROWS[dataset], label): float(value) for table, dataset, label, value in columns}


@cache
def published_table(name):
    """``benchmark/data/published_{name}.csv`` (``ablation`` or ``cost``) as a DataFrame."""
    return pd.read_csv(DATA / f"published_{name}.csv")


def paper_column(table, label, moved=None):
    """{row name: published number} of one configuration in the paper's ``table``; {} when it is not there.

    ``moved`` ({paper's row: our row}, from `paper_rows`) puts a published average beside ours over its sources.
    """
    moved = moved or {}
    return {moved.get(row, row): f"{value:.2f}" for (t, row, m), value in published_accuracy().items()
            if t == table and m == label}


def paper_rows(table, rows):
    """(``rows`` with, after each average the paper's ``table`` publishes over fewer of its sources, that
    average over only the paper's sources; {average row: that row}).

    Table 3 lists 5 of the 10 OOD sets: its "Avg OOD" stands beside "OOD Avg, the paper's 5 sources",
    not beside our average over all ten.
    """
    listed = {row for (t, row, _) in published_accuracy() if t == table}
    out, moved = [], {}
    for name, sources in rows:
        out.append((name, sources))
        theirs = tuple(s for s in sources if s in listed)
        if name in listed and len(sources) > 1 and theirs != sources:
            moved[name] = f"{name}, the paper's {len(theirs)} sources"
            out.append((moved[name], theirs))
    return out, moved


def paper_coverage_note(table, rows):
    """A note when the paper's ``table`` lacks some of our sources (Table 3 lists 5 of the 10 OOD sets)."""
    listed = {row for (t, row, _) in published_accuracy() if t == table}
    missing = [name for name, sources in rows if sources == (name,) and name not in listed]
    if not missing:
        return []
    return [f"The paper's {table.replace('table', 'Table ')} has no {', '.join(missing)}: its averages stand "
            "beside our averages over its sources only."]


# --- tables ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """One entry of the results index: a file and its content, or (content None) why it was skipped."""

    kind: str  # "table", "figure" or "index"
    filename: str
    title: str
    content: bytes | None = None
    run_ids: tuple = ()
    note: str = ""


def skipped(kind, filename, title, note):
    return Product(kind, filename, title, None, (), note)


def markdown(title, intro, header, body, notes):
    """A table file: title, what it shows, the table (github pipes), then footnotes."""
    table = tabulate(body, headers=header, tablefmt="github", disable_numparse=True)
    parts = [f"# {title}", intro, table, *notes]
    return ("\n\n".join(p for p in parts if p) + "\n").encode()


def marker_notes(cells_text, expected):
    """Footnotes for the markers that occur in ``cells_text``."""
    text = "".join(cells_text)
    notes = []
    if "*" in text:
        notes.append(f"\\* fewer than {expected} episodes (the benchmark's count) on this source, or, in an average, "
                     "on one of its sources.")
    if "†" in text:
        notes.append("† averaged over only the sources this column has.")
    return notes


STATS_NOTE = ("Cells: accuracy in percent, mean ± 95% CI over test episodes (CI = 1.96·std/√n, std with ddof = 0). "
              "Averages: mean of the per-source means, CI √(Σ CI²)/k.")


def run_ids_of(series):
    return tuple(sorted({run_id for s in series for run_id in s.run_ids}))


def accuracy_product(filename, title, intro, series, rows, paper_of=None, notes=()):
    """A per-source table: a column per series, each configuration's paper column (``paper_of``) after its runs."""
    columns = []
    for _, same in groupby(sorted_series(series), key=lambda s: s.config):
        same = list(same)
        columns += [(s.label, s.column(rows)) for s in same]
        paper = paper_of(same[0]) if paper_of else {}
        if paper:
            columns.append((f"{same[0].name} (paper)", paper))
    body = [[name, *(column.get(name, "—") for _, column in columns)] for name, _ in rows]
    expected = benchmark_sources(series[0].benchmark)[1]
    measured = [cell for s in series for cell in s.column(rows).values()]
    all_notes = [STATS_NOTE, *marker_notes(measured, expected), *notes]
    text = markdown(title, intro, ["Source", *(h for h, _ in columns)], body, all_notes)
    return Product("table", filename, title, text, run_ids_of(series))


def paper_accuracy_table(spec, series):
    """Table 1 or 3: the paper's methods × ProtoNet/full/LoRA on ``md_paper`` with ``spec.backbone``."""
    chosen = [s for s in series if spec.holds(s)]
    filename = f"{spec.name}.md"
    if not chosen:
        return skipped("table", filename, spec.title, f"no rows of {', '.join(spec.methods)} (default) with "
                       f"{', '.join(spec.adaptations)} on {PAPER_BENCHMARK} with {spec.backbone}")
    rows, moved = paper_rows(spec.name, table_rows(PAPER_BENCHMARK))
    measured = {s.name for s in chosen}
    unmeasured = sorted({m for (t, _, m) in published_accuracy() if t == spec.name} - measured)
    notes = [f"(paper): published in {spec.name.replace('table', 'Table ')} of the SMAT paper (ICML 2024); no CI."]
    notes += paper_coverage_note(spec.name, rows)
    if unmeasured:
        notes.append(f"Published but not measured here: {', '.join(unmeasured)}.")
    intro = f"Benchmark `{PAPER_BENCHMARK}`, backbone `{spec.backbone}`; rows are its test sources (ID, then OOD)."
    return accuracy_product(filename, spec.title, intro, chosen, rows, lambda s: paper_column(spec.name, s.name, moved),
                            notes)


@cache
def published_ablation():
    """``published_ablation.csv`` keyed by (model, (MLS, Meta, DT, IE)) → (ID Avg, OOD Avg, Avg)."""
    frame = published_table("ablation")
    flags = frame[["meta_learned_sparsity", "meta_split", "dense_teacher", "interpolated_experts"]].eq("yes")
    averages = frame[["id_avg", "ood_avg", "avg"]].itertuples(index=False)
    return {(model, tuple(switches)): tuple(values)
            for model, switches, values in zip(frame["model"], flags.itertuples(index=False), averages)}


def ablation_table(series):
    """Table 2: SMAT's variants and PMF with ProtoNet on ``md_paper``/DINO: averages and component switches."""
    title = "Table 2 — SMAT ablations (ProtoNet, DINO ViT-S/16)"
    chosen = [s for s in series if s.benchmark == PAPER_BENCHMARK and s.backbone == DINO and s.adaptation == "protonet"
              and (s.method == "smat" or (s.method, s.variant) == ("pmf", "default"))]
    if not chosen:
        return skipped("table", "table2.md", title,
                       f"no SMAT or PMF rows with protonet on {PAPER_BENCHMARK} with {DINO}")
    order = list(TABLE2_SWITCHES)
    chosen.sort(key=lambda s: (s.method == "pmf", _rank((s.method, s.variant), order), s.run_label))
    rows = table_rows(PAPER_BENCHMARK, averages=("ID Avg", "OOD Avg", "Avg"))[-3:]
    body, cells = [], []
    for s in chosen:
        switches = TABLE2_SWITCHES.get((s.method, s.variant))
        paper = published_ablation().get((METHODS[s.method], switches), ())
        measured = [format_cell(s.cell(sources)) for _, sources in rows]
        published = [f"{value:.2f}" for value in paper] or ["—"] * len(rows)
        cells += measured
        marks = ["✓" if on else "✗" for on in switches] if switches else ["?"] * 4
        body.append([s.label, *marks, *(x for pair in zip(measured, published) for x in pair)])
    header = ["Model", "MLS", "Meta", "DT", "IE"] + [h for name, _ in rows for h in (name, f"{name} (paper)")]
    notes = [STATS_NOTE, *marker_notes(cells, benchmark_sources(PAPER_BENCHMARK)[1]),
             "MLS: meta-learned sparsity; Meta: support/query split in meta-training; DT: dense teachers; "
             "IE: interpolated experts; ? a variant the paper does not have. "
             "(paper): Table 2 of the SMAT paper; no CI."]
    intro = f"Benchmark `{PAPER_BENCHMARK}`, backbone `{DINO}`, ProtoNet (no fine-tuning); Avg over all test sources."
    return Product("table", "table2.md", title, markdown(title, intro, header, body, notes), run_ids_of(chosen))


def smat_dino(series):
    return [s for s in series if s.benchmark == PAPER_BENCHMARK and s.backbone == DINO and s.method == "smat"
            and s.variant == "default"]


def strategies(series):
    """(SMAT series of Table 4, its source rows): the sources where SMAT ran gradient_free or full_joint."""
    smat = [s for s in smat_dino(series) if s.adaptation in TABLE4_LABELS]
    ran = {source for s in smat if s.adaptation in TABLE4_ADAPTERS for source in s.cells}
    sources = [name for name, _ in benchmark_sources(PAPER_BENCHMARK)[0] if name in ran]
    return (smat if sources else []), sources


@cache
def table4_sources():
    """The sources of the paper's Table 4 (five OOD sets), over which its Avg and Table 5's accuracy are taken."""
    return {row for (table, row, _) in published_accuracy() if table == "table4"}


def average_rows(sources):
    """Avg rows of Table 4: "Avg" over the paper's Table 4 sources when all of them are among ``sources``
    (the row the paper's Avg stands beside), and an average over all ``sources`` when they are others."""
    paper = [s for s in sources if s in table4_sources()]
    rows = [("Avg", tuple(paper))] if set(paper) == table4_sources() else []
    if set(sources) != table4_sources():
        rows.append((f"Avg, these {len(sources)} sources", tuple(sources)))
    return rows


def table4_paper_column(adaptation):
    """Published Table 4 numbers of one adapter; its Avg is Table 5's "Avg. Acc (Tab. 4)" where published."""
    column = paper_column("table4", TABLE4_LABELS[adaptation])
    cost = published_table("cost").set_index("method")
    if TABLE5_LABELS.get(adaptation) in cost.index:
        column["Avg"] = f"{cost.loc[TABLE5_LABELS[adaptation], 'avg_accuracy_table4']:.2f}"
    return column


def strategies_table(series):
    """Table 4: SMAT with protonet / gradient_free / full / full_joint on the sources where the latter two ran."""
    title = "Table 4 — SMAT fine-tuning strategies (DINO ViT-S/16)"
    smat, sources = strategies(series)
    if not smat:
        return skipped("table", "table4.md", title, f"no SMAT rows with {' or '.join(TABLE4_ADAPTERS)} on "
                       f"{PAPER_BENCHMARK} with {DINO}")
    rows = [(s, (s,)) for s in sources] + average_rows(sources)
    beside = "beside our Avg over the same five" if "Avg" in dict(rows) else "not shown: these runs lack some of them"
    notes = [f"(paper): Table 4 of the SMAT paper; its Avg is Table 5's average over its five sources "
             f"({', '.join(sorted(table4_sources()))}), {beside}; no CI."]
    intro = (f"Benchmark `{PAPER_BENCHMARK}`, backbone `{DINO}`; rows: the sources where SMAT ran "
             f"{' or '.join(TABLE4_ADAPTERS)}.")
    return accuracy_product("table4.md", title, intro, smat, rows, lambda s: table4_paper_column(s.adaptation), notes)


def cost_table(series):
    """Table 5: per SMAT adapter, mean seconds and peak GPU MiB per task and mean accuracy over common sources."""
    title = "Table 5 — SMAT's cost per adapter (DINO ViT-S/16)"
    smat = sorted_series(smat_dino(series))
    if not smat:
        return skipped("table", "table5.md", title, f"no SMAT rows on {PAPER_BENCHMARK} with {DINO}")
    common = [name for name, _ in benchmark_sources(PAPER_BENCHMARK)[0] if all(name in s.cells for s in smat)]
    all_paper_sources = table4_sources() <= set(common)  # the paper's accuracy is over its Table 4 sources
    accuracy_sources = [name for name in common if name in table4_sources()] if all_paper_sources else common
    paper = published_table("cost").set_index("method")
    body = []
    for s in smat:
        episodes = s.episodes[s.episodes["source"].isin(common)]
        memory = episodes["peak_memory_mib"].dropna()
        devices = sorted(s.rows.loc[s.rows["source"].isin(common), "device"].fillna("unknown").unique())
        label = TABLE5_LABELS.get(s.adaptation)
        published = paper.loc[label] if label in paper.index else None
        body.append([
            s.label, str(len(episodes)),
            f"{episodes['seconds'].mean():.2f}" if len(episodes) else "—",
            f"{published['seconds_per_task']:g}" if published is not None else "—",
            f"{memory.mean():.0f}" if len(memory) else "—",
            f"{published['gpu_memory_mib']:g}" if published is not None else "—",
            format_cell(s.cell(accuracy_sources)) if accuracy_sources else "—",
            f"{published['avg_accuracy_table4']:.2f}" if published is not None and all_paper_sources else "—",
            ", ".join(devices) or "—",
        ])
    header = ["Adapter", "Episodes", "Time (s/task)", "Time (paper)", "Peak GPU memory (MiB)", "GPU memory (paper)",
              "Avg accuracy", "Avg accuracy (paper)", "Device"]
    accuracy_note = ("the paper's Table 4 sources" if all_paper_sources else
                     "all of those (not the paper's Table 4 sources, so no paper figure beside it)")
    notes = [f"Over the episodes of the sources every adapter here ran: {', '.join(common) or 'none'}. Time: mean "
             "seconds of adaptation + prediction per task; memory: mean peak GPU memory per task (— on CPU); "
             f"Avg accuracy: over {accuracy_note}.",
             STATS_NOTE, *marker_notes([row[6] for row in body], benchmark_sources(PAPER_BENCHMARK)[1]),
             "(paper): Table 5 of the SMAT paper (FP16; accuracy averaged over Table 4's five sources)."]
    intro = f"Benchmark `{PAPER_BENCHMARK}`, backbone `{DINO}`, SMAT (default)."
    return Product("table", "table5.md", title, markdown(title, intro, header, body, notes), run_ids_of(smat))


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def other_tables(series, shown):
    """One Table-1-style file per (benchmark, backbone) for the series not ``shown`` in Table 1 or 3, so that
    every series has its ID Avg and OOD Avg in some table (Table 4's SMAT+gradient-free/full-joint too)."""
    rest = [s for s in series if s not in shown]
    products = []
    for (bench, backbone), same in groupby(sorted(rest, key=lambda s: (s.benchmark, s.backbone)),
                                           key=lambda s: (s.benchmark, s.backbone)):
        title = f"{bench} · {backbone}"
        intro = f"Benchmark `{bench}`, backbone `{backbone}`; rows are its test sources (ID, then OOD)."
        products.append(accuracy_product(f"{safe_name(bench)}__{safe_name(backbone)}.md", title, intro, list(same),
                                         table_rows(bench)))
    return products


# --- paired comparisons ------------------------------------------------------------------------------


def wilcoxon_p(differences):
    """Two-sided Wilcoxon signed-rank p-value; 1 when every difference is zero (no evidence either way)."""
    if not any(differences):
        return 1.0
    return float(wilcoxon(differences).pvalue)


def paired_differences(smat, baseline):
    """The per-episode accuracy differences SMAT − baseline on the episodes both have, with their source."""
    both = smat.episodes.merge(baseline.episodes, on=list(EPISODE_KEYS), suffixes=("", "_baseline"))
    return both.assign(difference=both["accuracy"] - both["accuracy_baseline"])[["source", "difference"]]


def paired_section(smat, baseline):
    """Markdown table: per source and averaged, mean difference ± CI, n and the Wilcoxon p-value."""
    pairs = paired_differences(smat, baseline)
    expected = benchmark_sources(smat.benchmark)[1]
    by_source = {source: group["difference"].tolist() for source, group in pairs.groupby("source", sort=True)}
    cells = {source: source_cell(d, expected) for source, d in by_source.items()}
    body = []
    for name, sources in table_rows(smat.benchmark, averages=("ID Avg", "OOD Avg", "Avg")):
        cell = average_cell([cells.get(s) for s in sources])
        pooled = [d for s in sources for d in by_source.get(s, [])]
        body.append([name, format_cell(cell, signed=True), str(len(pooled)),
                     f"{wilcoxon_p(pooled):.3g}" if pooled else "—"])
    return tabulate(body, headers=["Source", "Δ (points) ± 95% CI", "n", "Wilcoxon p"], tablefmt="github",
                    disable_numparse=True)


def paired_table(series):
    """``paired.md``: each SMAT series against each other method's series of the same benchmark/backbone/adapter."""
    title = "Paired comparisons — SMAT minus each baseline on the same episodes"
    sections, used = [], []
    for (bench, backbone, adaptation), same in groupby(
            sorted(series, key=lambda s: (s.benchmark, s.backbone, _rank(s.adaptation, ADAPTERS), s.sort_key)),
            key=lambda s: (s.benchmark, s.backbone, s.adaptation)):
        same = list(same)
        pairs = [(a, b) for a in same if a.method == "smat" for b in same if b.method != "smat"]
        if pairs:
            sections.append(f"## {bench} · {backbone} · {adaptation}")
        for smat, baseline in pairs:
            sections += [f"### {smat.label} − {baseline.label}", paired_section(smat, baseline)]
            used += [smat, baseline]
    if not sections:
        return skipped("table", "paired.md", title, "no SMAT series beside another method on the same benchmark, "
                       "backbone and adapter")
    intro = ("Δ = SMAT − baseline accuracy in points, mean over the episodes both evaluated (same benchmark, source, "
             "split, seed, episode); CI = 1.96·std/√n of the per-episode differences (ddof = 0); p: two-sided "
             "Wilcoxon signed-rank test (scipy.stats.wilcoxon; 1 when every difference is zero). Averages: mean of "
             "per-source Δ with CI √(Σ CI²)/k; their n and p pool the episodes of their sources. \\* fewer paired "
             "episodes than the benchmark declares; † some sources have no paired episodes.")
    text = "\n\n".join([f"# {title}", intro, *sections]) + "\n"
    return Product("table", "paired.md", title, text.encode(), run_ids_of(used))


# --- the index and the command -----------------------------------------------------------------------


def render_tables(results, merge_runs=False):
    """Every table `Product` (written or skipped), in index order."""
    series = results.series(merge_runs)
    shown = [s for s in series if TABLE1.holds(s) or TABLE3.holds(s)]  # Table 4 has no ID Avg / OOD Avg rows
    return [paper_accuracy_table(TABLE1, series), ablation_table(series), paper_accuracy_table(TABLE3, series),
            strategies_table(series), cost_table(series), *other_tables(series, shown), paired_table(series)]


def run_summary(results):
    """One row per run: id, configuration, adapters, episodes, config hash(es), code version(s), device(s)."""
    body = []
    for run_id, rows in results.rows.groupby("run_id", sort=True):
        first = rows.iloc[0]
        body.append([f"`{run_id}`", first["method"], first["variant"], first["backbone"], first["benchmark"],
                     ", ".join(sorted(rows["adaptation"].unique(), key=lambda a: _rank(a, ADAPTERS))), str(len(rows)),
                     ", ".join(sorted(rows["config_hash"].unique())), ", ".join(sorted(rows["code_version"].unique())),
                     ", ".join(sorted(rows["device"].fillna("unknown").unique()))])
    return tabulate(body, headers=["run id", "method", "variant", "backbone", "benchmark", "adapters", "rows",
                                   "config hash", "code version", "device"], tablefmt="github", disable_numparse=True)


def provenance(results, run_ids):
    """Markdown sub-bullets: each run id with its config hash(es) and code version(s), shortened."""
    lines = []
    for run_id in run_ids:
        mine = results.rows[results.rows["run_id"] == run_id]
        hashes = ", ".join(h[:12] for h in sorted(mine["config_hash"].unique()))
        codes = ", ".join(re.sub(r"^([0-9a-f]{10})[0-9a-f]{30}", r"\1", code)  # a git commit's first 10 digits
                          for code in sorted(mine["code_version"].unique()))
        lines.append(f"  - `{run_id}` · config `{hashes}` · code `{codes}`")
    return lines


def render_readme(products, results, merge_runs=False, commands=None):
    """``README.md``: how the runs were made (``commands``: the text of the script that made them, if
    given), what each file holds and which runs made it; what was skipped and why; the runs."""
    lines = ["# Results", "",
             "Regenerated by `python -m benchmark.leaderboard RUN_DIR [RUN_DIR ...] --out results/` from the runs' "
             "`episodes.jsonl` rows; the paper's numbers come from `benchmark/data/published_*.csv`. Config hashes "
             "and code versions are shortened here; the table of runs at the end has them in full.", ""]
    if commands is not None:
        lines += ["## How these runs were made", "", "```bash", commands.rstrip("\n"), "```", ""]
    lines += [
             f"Input: {len(results.rows)} result rows of {results.rows['run_id'].nunique()} runs; "
             f"{results.smoke_rows} smoke rows ignored; {results.repeated_rows} repeated rows counted once; runs of "
             f"one configuration {'merged (--merge-runs)' if merge_runs else 'shown separately'}.", ""]
    for kind, heading in (("table", "Tables"), ("figure", "Figures")):
        written = [p for p in products if p.kind == kind and p.content is not None]
        lines += [f"## {heading}", ""]
        for p in written:
            lines += [f"- [{p.filename}]({p.filename}) — {p.title}. Made from:", *provenance(results, p.run_ids)]
        if not written:
            lines.append(f"No {heading.lower()} were made.")
        lines.append("")
    skips = [p for p in products if p.content is None]
    if skips:
        lines += ["## Skipped", ""] + [f"- {p.filename} ({p.title}): {p.note}." for p in skips] + [""]
    if len(results.rows):
        lines += ["## Runs", "", run_summary(results), ""]
    return "\n".join(lines).encode()


GENERATED = ".generated"  # in ``--out``: the files the last generation wrote; the next removes those it does not write


def is_product_name(name):
    """Whether ``name`` is a file name the leaderboard writes: a plain ``*.md`` / ``*.png`` name, not hidden."""
    return Path(name).name == name and not name.startswith(".") and Path(name).suffix in (".md", ".png")


def previous_products(manifest):
    """The file names ``manifest`` (``OUT/.generated``) lists; none when it is missing.

    Raises:
        DataError: naming ``manifest:line`` for a line that is not `is_product_name` (a path, ``..``, an
            absolute or hidden name): the leaderboard only ever removes files it wrote into ``--out``.
    """
    names = manifest.read_text().splitlines() if manifest.exists() else []
    for number, name in enumerate(names, 1):
        if name and not is_product_name(name):
            raise DataError(f"{manifest}:{number}: {name!r} is not a file the leaderboard writes (a plain *.md or "
                            f"*.png name in {manifest.parent}), so it is not removed; nothing was written: delete "
                            "that line (or the whole file) and run again")
    return set(names) - {""}


def write_results(run_dirs, out, merge_runs=False, commands=None):
    """Read ``run_dirs``, write every table, figure and the index into ``out`` (removing those an earlier
    generation wrote that this one does not, `previous_products`; other files in ``out`` are left alone);
    return the paths written. ``commands``: a script quoted in the index (`render_readme`)."""
    from benchmark.figures import render_figures  # the figure stage builds on this module's readers

    results = load_results(run_dirs)
    products = [*render_tables(results, merge_runs), *render_figures(results)]
    products.append(Product("index", "README.md", "Index", render_readme(products, results, merge_runs, commands)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / GENERATED
    previous = previous_products(manifest)
    names = [product.filename for product in products if product.content is not None]
    for product in products:
        if product.content is not None:
            (out / product.filename).write_bytes(product.content)
    for stale in sorted(previous - set(names)):  # a table or figure of runs no longer given
        (out / stale).unlink(missing_ok=True)
    manifest.write_text("".join(f"{name}\n" for name in names))
    return [*(out / name for name in names), manifest]


def build_parser():
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories searched for episodes.jsonl")
    parser.add_argument("--out", default="results", help="output directory (default: results/)")
    parser.add_argument("--merge-runs", action="store_true",
                        help="one column per configuration: per-episode accuracy averaged over its runs")
    parser.add_argument("--commands", metavar="SCRIPT",
                        help="the script that made the runs, quoted in README.md (e.g. results/regenerate.sh)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with exit_on_error(PROG):
        commands = None
        if args.commands:
            try:
                commands = Path(args.commands).read_text()
            except OSError as err:
                raise DataError(f"--commands {args.commands}: {err.strerror}; name the script that made the runs") from None
        for path in write_results(args.run_dirs, args.out, args.merge_runs, commands):
            print(path)


if __name__ == "__main__":
    main()
