"""The declarative registry: declarations parse, agree with the official specs, and fail clearly."""

import json
import shutil
from pathlib import Path

import pytest

from registry import catalog
from registry.catalog import get_benchmark, get_source, list_benchmarks, list_sources, resolve_records_root
from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import Split
from registry.errors import DataError

SPECS_DIR = Path(__file__).resolve().parents[1] / "data" / "shared" / "conformance" / "specs"
MD_ID = ["ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower"]
MD_OOD = ["traffic_sign", "mscoco", "cifar10", "cifar100", "mnist", "sketch", "pet", "clipart", "food", "cars"]


@pytest.fixture
def isolated_registry(tmp_path, monkeypatch):
    """Point the registry at copies of its TOML files in ``tmp_path`` (and forget cached parses)."""
    sources, benchmarks = tmp_path / "sources.toml", tmp_path / "benchmarks.toml"
    shutil.copy(catalog.SOURCES_FILE, sources)
    shutil.copy(catalog.BENCHMARKS_FILE, benchmarks)
    monkeypatch.setattr(catalog, "SOURCES_FILE", sources)
    monkeypatch.setattr(catalog, "BENCHMARKS_FILE", benchmarks)
    catalog._sources.cache_clear()
    catalog._benchmarks.cache_clear()
    yield sources, benchmarks
    catalog._sources.cache_clear()
    catalog._benchmarks.cache_clear()


def test_all_eighteen_paper_sources_are_declared_with_their_roles():
    assert list_sources(role="id")[:8] == MD_ID
    assert set(MD_OOD) <= set(list_sources(role="ood"))


@pytest.mark.parametrize("name", sorted(p.name for p in SPECS_DIR.iterdir() if p.is_dir()))
def test_declared_class_counts_match_the_official_spec(name):
    source = get_source(name)
    spec = source.load_spec(SPECS_DIR)
    assert {s.value.lower(): spec.classes_per_split[s] for s in Split} == source.classes


def test_md_paper_trains_on_8_id_sources_and_tests_18():
    bench = get_benchmark("md_paper")
    assert [s.name for s in bench.train_sources] == MD_ID
    assert [s.name for s in bench.test_sources] == MD_ID + ["traffic_sign", "mscoco", "cifar10", "cifar100", "mnist",
                                                            "sketch", "pet", "clipart", "food", "cars"]
    assert bench.test_episodes == 600
    assert bench.config_for("test") == bench.config_for("train") == EpisodeDescriptionConfig()


@pytest.mark.parametrize("name, shots, smallest", [("md_paper_5w1s", 1, 16), ("md_paper_5w5s", 5, 20)])
def test_fixed_way_shot_variants_fix_evaluation_only(name, shots, smallest):
    bench = get_benchmark(name)
    assert bench.config_for("test") == EpisodeDescriptionConfig(
        num_ways=5, num_support=shots, num_query=15, min_examples_in_class=smallest,
        ignore_dag_ontology=True, ignore_bilevel_ontology=True,
    )
    assert bench.config_for("valid") == bench.config_for("test")
    assert bench.config_for("train") == EpisodeDescriptionConfig()
    assert bench.test_sources == get_benchmark("md_paper").test_sources


def test_mini_benchmark_has_bilevel_dag_and_ood_sources():
    bench = get_benchmark("md_mini")
    ontologies = {s.ontology for s in bench.train_sources}
    assert {"flat", "bilevel", "dag"} <= ontologies
    assert len([s for s in bench.test_sources if s.role == "ood"]) >= 2
    assert all(s.role == "pretrain" for s in bench.pretrain_sources)
    assert not {s.name for s in bench.pretrain_sources} & {s.name for s in bench.test_sources + bench.train_sources}


def test_unknown_names_list_close_matches():
    with pytest.raises(DataError, match="unknown source 'fungus'; did you mean 'fungi'"):
        get_source("fungus")
    with pytest.raises(DataError, match="unknown benchmark 'md_papr'; did you mean 'md_paper'"):
        get_benchmark("md_papr")
    assert list_benchmarks("md_paper*") == ["md_paper", "md_paper_5w1s", "md_paper_5w5s"]


def write_spec(directory, counts, kind="DatasetSpecification"):
    directory.mkdir(parents=True)
    n = sum(counts)
    spec = {
        "name": directory.name, "classes_per_split": dict(zip(["TRAIN", "VALID", "TEST"], counts)),
        "images_per_class": {str(i): 20 for i in range(n)}, "class_names": {str(i): f"c{i}" for i in range(n)},
        "path": "x", "file_pattern": "{}.tfrecords", "__class__": kind,
    }
    (directory / "dataset_spec.json").write_text(json.dumps(spec))


def test_spec_that_disagrees_with_the_declaration_names_source_split_and_fix(tmp_path):
    write_spec(tmp_path / "fungi", (0, 200, 200))
    with pytest.raises(DataError) as err:
        get_source("fungi").load_spec(tmp_path)
    assert "source 'fungi' expects 994 train classes" in str(err.value)
    assert "has 0" in str(err.value) and "re-run the official Meta-Dataset conversion for fungi" in str(err.value)


def test_missing_spec_says_how_to_convert(tmp_path):
    with pytest.raises(DataError, match=r"source 'sketch': .*dataset_spec.json: no such file.*registry.convert sketch"):
        get_source("sketch").load_spec(tmp_path)


def test_spec_of_the_wrong_kind_is_rejected(tmp_path):
    write_spec(tmp_path / "omniglot", (883, 81, 659))
    with pytest.raises(DataError, match="declared bilevel .* is a DatasetSpecification"):
        get_source("omniglot").load_spec(tmp_path)


def test_records_root_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    bench = get_benchmark("md_paper")
    monkeypatch.delenv(catalog.RECORDS_ENV, raising=False)
    with pytest.raises(DataError, match="SMAT_BENCH_RECORDS"):
        resolve_records_root(bench)
    monkeypatch.setenv(catalog.RECORDS_ENV, str(tmp_path))
    assert resolve_records_root(bench) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_records_root(bench, other) == other
    with pytest.raises(DataError, match="is not a directory"):
        resolve_records_root(bench, tmp_path / "missing")


@pytest.mark.parametrize(
    "file, old, new, message",
    [
        ("sources", 'image_size = 128\nresize', 'image_sise = 128\nresize', r"\[defaults\]: unknown key\(s\) \['image_sise'\]"),
        ("sources", 'role = "ood"\nclasses = { train = 0, valid = 0, test = 43 }', 'role = "odd"\nclasses = { train = 0, valid = 0, test = 43 }', r"\[traffic_sign\].role is 'odd'; choose one of id, ood, pretrain"),
        ("sources", "classes = { train = 70, valid = 15, test = 15 }", "classes = { train = 70, valid = 15 }", r"\[aircraft\].classes must be"),
        ("benchmarks", '"dtd", "quickdraw"', '"dtdd", "quickdraw"', r"\[md_paper\].train_sources: unknown source 'dtdd'; did you mean 'dtd'"),
        ("benchmarks", "num_support = 1,", "num_suport = 1,", r"\[md_paper_5w1s\].eval_episode_config: unknown field"),
        ("benchmarks", 'extends = "md_paper"\ndescription = "md_paper evaluated 5-way 1-shot', 'extends = "md_papers"\ndescription = "md_paper evaluated 5-way 1-shot', r"unknown benchmark to extend 'md_papers'"),
        ("benchmarks", "test_episodes = 600", "test_episodes = -1", r"\[defaults\]|test_episodes must be a non-negative integer"),
    ],
)
def test_bad_declarations_name_the_file_and_key(isolated_registry, file, old, new, message):
    path = isolated_registry[0] if file == "sources" else isolated_registry[1]
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(DataError, match=message) as err:
        get_benchmark("md_paper_5w1s")
    assert path.name in str(err.value)
