"""Contract C1: ``python -m registry.episodes`` prints official descriptions, one JSON line each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import load_dataset_spec
from registry.episodes import build_parser, config_from_args
from registry.sampling import EpisodeDescriptionSampler

ROOT = Path(__file__).resolve().parents[2]
SHARED_PARENT = ROOT / "tests" / "data"  # the directory holding the snapshot of shared/
SAMPLER_DIR = SHARED_PARENT / "shared" / "conformance" / "sampler"
MANIFEST = json.loads((SAMPLER_DIR / "manifest.json").read_text())


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "registry.episodes", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )


def override_flags(overrides):
    flags = []
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, value]
    return flags


@pytest.mark.parametrize("entry", MANIFEST["files"], ids=[e["file"] for e in MANIFEST["files"]])
def test_cli_prints_the_golden_lines(entry):
    result = run_cli(
        "--spec", SHARED_PARENT / entry["spec"], "--split", entry["split"].lower(), "--seed", entry["seed"],
        "--episodes", entry["n_episodes"], *override_flags(entry["config_overrides"]),
    )
    assert result.returncode == 0, result.stderr
    expected = (SAMPLER_DIR / entry["file"]).read_text().splitlines()
    assert [json.loads(line) for line in result.stdout.splitlines()] == [json.loads(line) for line in expected]


def test_rejected_input_prints_earlier_episodes_then_one_error_line():
    spec_dir = SAMPLER_DIR / "toy"
    config = EpisodeDescriptionConfig(num_ways=5, num_support=5, num_query=15)
    sampler = EpisodeDescriptionSampler.from_seed(load_dataset_spec(spec_dir), "train", config, 0)
    good = []
    with pytest.raises(ValueError):
        while True:
            good.append(sampler.sample_episode_description())
    result = run_cli("--spec", spec_dir, "--split", "train", "--seed", 0, "--episodes", 100,
                     "--num-ways", 5, "--num-support", 5, "--num-query", 15)
    assert result.returncode != 0
    assert [tuple(map(tuple, json.loads(line))) for line in result.stdout.splitlines()] == good
    assert result.stderr.strip().splitlines() == [
        "python -m registry.episodes: error: Some classes do not have enough examples."
    ]


def test_construction_error_exits_nonzero_with_the_official_message():
    result = run_cli("--spec", SHARED_PARENT / "shared/conformance/specs/traffic_sign", "--split", "train",
                     "--seed", 0, "--episodes", 1)
    assert result.returncode == 2 and result.stdout == ""
    assert '"min_ways" is set to 5, but split Split.TRAIN of dataset traffic_sign only has 0 classes' in result.stderr


def test_missing_spec_names_the_file():
    result = run_cli("--spec", "/nonexistent/source", "--split", "test", "--seed", 0, "--episodes", 1)
    assert result.returncode == 2
    assert "/nonexistent/source/dataset_spec.json: no such file" in result.stderr


def _spec_with(tmp_path, source, edit):
    """A copy of the conformance spec of ``source`` as ``edit(spec dict)`` returns it."""
    d = json.loads((SHARED_PARENT / "shared/conformance/specs" / source / "dataset_spec.json").read_text())
    (tmp_path / "dataset_spec.json").write_text(json.dumps(edit(d)))
    return tmp_path


def _table(d, tables):
    for name in tables:
        d = d[name]
    return d


def _without(d, *path):
    """``d`` with the entry at ``path`` (keys, the last one removed) taken out."""
    del _table(d, path[:-1])[path[-1]]
    return d


def _set(d, value, *path):
    """``d`` with the entry at ``path`` (keys) set to ``value``."""
    _table(d, path[:-1])[path[-1]] = value
    return d


def _first_test_leaf(d):
    return sorted(n["wn_id"] for n in d["split_subgraphs"]["TEST"] if not n["children_ids"])[0]


def _without_count_of_first_test_leaf(d):
    return _without(d, "images_per_class", "TEST", _first_test_leaf(d))


def _test_dag_edited(d, edit):
    """``d`` with ``edit(first internal node, its first child)`` applied to its TEST sub-DAG."""
    nodes = {n["wn_id"]: n for n in d["split_subgraphs"]["TEST"]}
    parent = next(n for n in nodes.values() if n["children_ids"])
    edit(parent, nodes[parent["children_ids"][0]])
    return d


@pytest.mark.parametrize("source, edit, message", [
    ("aircraft", lambda d: [d], "not a dataset spec (its top level is a JSON list"),
    ("aircraft", lambda d: {**d, "__class__": [d["__class__"]]}, "'__class__' is ['DatasetSpecification']; expected"),
    ("aircraft", lambda d: {**d, "classes_per_split": [70, 15, 15]}, "malformed DatasetSpecification (AttributeError"),
    ("omniglot", lambda d: _without(d, "classes_per_superclass", "3"), "malformed BiLevelDatasetSpecification (KeyError: 3)"),
    ("ilsvrc_2012", _without_count_of_first_test_leaf, "has no images_per_class.TEST entry for n"),
    ("ilsvrc_2012", lambda d: _without(d, "class_names", "5"), "has no class_names entry for n"),
    ("ilsvrc_2012", lambda d: _test_dag_edited(d, lambda parent, child: parent["children_ids"].append("n0")),
     "has a child n0 that is not a node of the TEST split"),
    ("ilsvrc_2012", lambda d: _test_dag_edited(d, lambda parent, child: child["children_ids"].append(parent["wn_id"])),
     "TEST sub-DAG has a cycle"),
    ("aircraft", lambda d: _set(d, -5, "images_per_class", "90"),
     "malformed DatasetSpecification (ValueError: images_per_class entry 90 is -5; a count cannot be negative)"),
    ("aircraft", lambda d: _set(d, -1, "classes_per_split", "VALID"), "classes_per_split entry VALID is -1"),
    ("omniglot", lambda d: _set(d, -2, "classes_per_superclass", "3"),
     "malformed BiLevelDatasetSpecification (ValueError: classes_per_superclass entry 3 is -2"),
    ("omniglot", lambda d: _set(d, -7, "images_per_class", "0"), "images_per_class entry 0 is -7"),
    ("ilsvrc_2012", lambda d: _set(d, -3, "images_per_class", "TEST", _first_test_leaf(d)),
     "malformed HierarchicalDatasetSpecification (ValueError: images_per_class.TEST entry n"),
], ids=["list", "class_list", "wrong_type", "bilevel_missing_superclass", "dag_missing_count", "dag_missing_name",
        "dag_stray_child", "dag_cycle", "negative_images", "negative_classes", "bilevel_negative_classes",
        "bilevel_negative_images", "dag_negative_images"])
def test_a_malformed_spec_is_one_error_naming_the_problem(tmp_path, source, edit, message):
    """Checked when the spec loads, whichever split is sampled (here train; the DAG faults are in other splits)."""
    result = run_cli("--spec", _spec_with(tmp_path, source, edit), "--split", "train", "--seed", 0, "--episodes", 1)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr


def test_every_config_field_has_a_flag_and_unset_flags_keep_the_defaults():
    parser = build_parser()
    base = ["--spec", "x", "--split", "test", "--seed", "0", "--episodes", "1"]
    assert config_from_args(parser.parse_args(base)) == EpisodeDescriptionConfig()
    flags = {a.dest for a in parser._actions}
    assert set(EpisodeDescriptionConfig.field_names()) <= flags
    args = parser.parse_args(base + ["--min-ways", "3", "--num-support", "2,4", "--ignore-dag-ontology",
                                     "--min-log-weight", "-0.5"])
    assert config_from_args(args) == EpisodeDescriptionConfig(
        min_ways=3, num_support=(2, 4), ignore_dag_ontology=True, min_log_weight=-0.5
    )


def test_cli_does_not_import_torch():
    code = "import sys, registry.episodes; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


BAD_COUNTS = [
    (["--episodes", "0"], "--episodes is 0; give the number of descriptions to print (at least 1)"),
    (["--episodes", "-1"], "--episodes is -1; give the number of descriptions to print (at least 1)"),
    (["--seed", "-1"], "--seed is -1; give an integer from 0 to 2**32 - 1"),
    (["--num-ways", "-3"], "num_ways is -3; give an integer of at least 1 or leave it unset"),
    (["--num-ways", "0"], "num_ways is 0; give an integer of at least 1 or leave it unset"),
    (["--num-support", "0"], "num_support is 0; give an integer of at least 1 or leave it unset"),
    (["--num-query", "0"], "num_query is 0; give an integer of at least 1 or leave it unset"),
    (["--num-query", "-1"], "num_query is -1; give an integer of at least 1 or leave it unset"),
    (["--min-ways", "0"], "min_ways is 0; give an integer of at least 1"),
    (["--max-num-query", "0"], "max_num_query is 0; give an integer of at least 1"),
    (["--max-ways-upper-bound", "3"], "max_ways_upper_bound=3 is below min_ways=5; raise one or lower the other."),
    (["--max-support-size-contrib-per-class", "-2"], "max_support_size_contrib_per_class is -2; give an integer"),
    (["--min-log-weight", "nan"], "min_log_weight is nan; give a finite number"),
    (["--max-log-weight", "nan"], "max_log_weight is nan; give a finite number"),
    (["--min-log-weight=-inf"], "min_log_weight is -inf; give a finite number"),
]


@pytest.mark.parametrize("flags, message", BAD_COUNTS, ids=[" ".join(flags) for flags, _ in BAD_COUNTS])
def test_a_nonpositive_count_or_nonfinite_weight_is_one_error_line_before_any_episode(flags, message):
    """Counts the official sampler would turn into empty episodes, 0-shot or 0-query classes, numpy errors or an
    OverflowError traceback are refused up front; the line names the field."""
    given = {f.split("=")[0] for f in flags}
    defaults = [x for flag in ("--seed", "--episodes") if flag not in given for x in (flag, "2")]
    result = run_cli("--spec", SHARED_PARENT / "shared/conformance/specs/aircraft", "--split", "test", *defaults, *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and f"python -m registry.episodes: error: {message}" in result.stderr


def test_a_reader_that_stops_early_ends_it_quietly():
    """``| head -1``: the writes after the reader left fail with EPIPE; no BrokenPipeError traceback, status 1."""
    process = subprocess.Popen(
        [sys.executable, "-m", "registry.episodes", "--spec", SHARED_PARENT / "shared/conformance/specs/aircraft",
         "--split", "test", "--seed", "0", "--episodes", "100000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    first = json.loads(process.stdout.readline())
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert stderr == "" and first
