"""registry.mini: the embedded mini benchmark is deterministic, well-formed, learnable and written atomically."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from benchmark.records import RecordFile, decode_image
from registry import mini
from registry.dataset_spec import (
    BiLevelDatasetSpecification,
    DatasetSpecification,
    HierarchicalDatasetSpecification,
    Split,
    load_dataset_spec,
)
from registry.errors import DataError

ID_SOURCES = ("mini_shapes", "mini_textures", "mini_glyphs", "mini_objects")
OOD_SOURCES = ("mini_digits", "mini_sketch")
PRETRAIN_SOURCE = "mini_pretrain"
KINDS = {"mini_glyphs": BiLevelDatasetSpecification, "mini_objects": HierarchicalDatasetSpecification}
MAX_SPANNING_LEAVES_ELIGIBLE = 392  # the official sampler's cap on the leaves of an eligible DAG node
MIN_WAYS = 5


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a generation."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return mini.generate(tmp_path_factory.mktemp("first") / "md_mini")


def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_source_raises(*args, **kwargs):
    raise AssertionError("the mini benchmark was written although a complete copy exists")


# --- determinism ---------------------------------------------------------------------------------


def test_every_source_has_a_role():
    assert set(mini.MINI_SOURCES) == set(ID_SOURCES) | set(OOD_SOURCES) | {PRETRAIN_SOURCE}
    assert len(mini.MINI_SOURCES) == len(set(mini.MINI_SOURCES))


def test_two_generations_are_byte_identical(root, tmp_path):
    first, second = _files(root), _files(mini.generate(tmp_path / "md_mini"))
    assert list(first) == list(second)
    assert [name for name in first if first[name] != second[name]] == []
    assert {name.split("/")[0] for name in first} == set(mini.MINI_SOURCES) | {mini.MANIFEST}


def test_an_image_drawn_alone_equals_its_stored_record(root):
    for name in mini.MINI_SOURCES:
        source = mini.mini_source(name)
        for class_id in reversed(range(0, source.spec.num_classes, 5)):
            records = RecordFile(root / name / f"{class_id}.tfrecords")
            for index in (len(records) - 1, 0):
                assert source.image_bytes(class_id, index) == records.example(index)[0], (name, class_id, index)


# --- specs and records ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", mini.MINI_SOURCES)
def test_spec_loads_as_its_kind_and_records_match_it(root, name):
    spec = load_dataset_spec(root / name)
    assert type(spec) is KINDS.get(name, DatasetSpecification)
    assert dataclasses.replace(spec, path="") == mini.mini_source(name).spec
    assert sorted(p.name for p in (root / name).glob("*.tfrecords")) == sorted(
        f"{c}.tfrecords" for c in range(spec.num_classes)
    )
    for class_id in range(spec.num_classes):
        records = RecordFile(spec.class_path(class_id))
        assert len(records) == spec.get_total_images_per_class(class_id)
        assert {records.example(i)[1] for i in range(len(records))} == {class_id}
        image = decode_image(records.example(0)[0])
        assert image.shape == (mini.IMAGE_SIZE, mini.IMAGE_SIZE, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("name", mini.MINI_SOURCES)
def test_images_per_class_vary_between_20_and_40(name):
    counts = list(mini.mini_source(name).spec.images_per_class.values())
    assert min(counts) >= 20 and max(counts) <= 40
    assert len(set(counts)) > 1


@pytest.mark.parametrize("name", ID_SOURCES)
def test_id_sources_have_at_least_5_classes_in_every_split(name):
    spec = mini.mini_source(name).spec
    assert all(spec.classes_per_split[s] >= MIN_WAYS for s in Split), spec.classes_per_split


@pytest.mark.parametrize("name", OOD_SOURCES)
def test_ood_sources_have_test_classes_only(name):
    spec = mini.mini_source(name).spec
    assert spec.classes_per_split == {Split.TRAIN: 0, Split.VALID: 0, Split.TEST: spec.num_classes}
    assert spec.num_classes >= 10


def test_pretrain_source_has_at_least_24_train_classes_only():
    spec = mini.mini_source(PRETRAIN_SOURCE).spec
    assert spec.classes_per_split == {Split.TRAIN: spec.num_classes, Split.VALID: 0, Split.TEST: 0}
    assert spec.num_classes >= 24


def test_every_alphabet_has_at_least_5_characters_and_owns_a_contiguous_id_range():
    spec = mini.mini_source("mini_glyphs").spec
    assert all(spec.superclasses_per_split[s] >= 1 for s in Split)
    for alphabet in range(sum(spec.superclasses_per_split.values())):
        assert spec.classes_per_superclass[alphabet] >= MIN_WAYS
        first = spec.class_offset_of_superclass(alphabet)
        for class_id in range(first, first + spec.classes_per_superclass[alphabet]):
            assert spec.class_names[class_id].startswith(spec.superclass_names[alphabet] + "-")


def test_each_split_is_an_isolated_sorted_subdag_whose_leaves_are_its_classes(root):
    spec = load_dataset_spec(root / "mini_objects")
    seen = set()
    for split in Split:
        nodes = spec.split_subgraphs[split]
        by_id = {n["wn_id"]: n for n in nodes}
        assert [n["wn_id"] for n in nodes] == sorted(by_id) and not seen & set(by_id)
        seen |= set(by_id)
        for node in nodes:
            assert node["children_ids"] == sorted(node["children_ids"])
            assert node["parents_ids"] == sorted(node["parents_ids"])
            assert all(node["wn_id"] in by_id[child]["parents_ids"] for child in node["children_ids"])
            assert all(node["wn_id"] in by_id[parent]["children_ids"] for parent in node["parents_ids"])
        assert len([n for n in nodes if not n["parents_ids"]]) == 1
        leaves = [spec.class_names[c] for c in spec.get_classes(split)]
        assert leaves == spec.leaves(split) == sorted(leaves)
        spans = dict(spec.spanning_leaves(split)) | {leaf: [leaf] for leaf in leaves}
        counts = spec.images_per_class_by_wn_id[split]
        assert counts == {wn: sum(counts[leaf] for leaf in spans[wn]) for wn in by_id}
        eligible = [
            wn for wn, span in spec.spanning_leaves(split) if MIN_WAYS <= len(span) <= MAX_SPANNING_LEAVES_ELIGIBLE
        ]
        assert eligible, f"{split}: no internal node spans {MIN_WAYS}..{MAX_SPANNING_LEAVES_ELIGIBLE} leaves"


def test_pretrain_classes_are_disjoint_from_benchmark_classes():
    benchmark = {p for name in ID_SOURCES + OOD_SOURCES for p in mini.mini_source(name).class_params}
    pretrain = mini.mini_source(PRETRAIN_SOURCE).class_params
    assert len(set(pretrain)) == len(pretrain) and not benchmark & set(pretrain)
    assert {p[0] for p in pretrain} == {"shape", "texture", "glyph", "object"}

    def groups(params, domain):  # alphabets share a style and object families a silhouette
        return {p[1] for p in params if p[0] == domain}

    for domain in ("glyph", "object"):
        assert not groups(benchmark, domain) & groups(pretrain, domain)


# --- learnability --------------------------------------------------------------------------------


def _episode_pools(spec, split):
    """Class ids an episode may draw from together: one alphabet, one DAG node with >= 5 leaves, or the split."""
    if isinstance(spec, BiLevelDatasetSpecification):
        firsts = {a: spec.class_offset_of_superclass(a) for a in spec.get_superclasses(split)}
        return [list(range(first, first + spec.classes_per_superclass[a])) for a, first in firsts.items()]
    if isinstance(spec, HierarchicalDatasetSpecification):
        return [
            [spec.class_names_to_ids[leaf] for leaf in leaves]
            for _, leaves in spec.spanning_leaves(split)
            if len(leaves) >= MIN_WAYS
        ]
    return [list(spec.get_classes(split))]


@pytest.mark.parametrize("name", mini.MINI_SOURCES)
def test_nearest_centroid_on_pixels_beats_40_percent_on_5_way_5_shot(root, name):
    spec = load_dataset_spec(root / name)
    split = Split.TRAIN if name == PRETRAIN_SOURCE else Split.TEST
    pools = _episode_pools(spec, split)
    rng = np.random.default_rng(0)
    accuracies = []
    for episode in range(8):
        classes = rng.choice(pools[episode % len(pools)], MIN_WAYS, replace=False)
        centroids, queries = [], []
        for way, class_id in enumerate(classes):
            records = RecordFile(spec.class_path(class_id))
            order = rng.permutation(len(records))[:20]
            pixels = np.stack([decode_image(records.example(int(i))[0]) for i in order]).astype(np.float64)
            features = pixels.reshape(20, 16, 2, 16, 2, 3).mean(axis=(2, 4)).reshape(20, -1)  # 16×16 RGB
            centroids.append(features[:5].mean(axis=0))
            queries += [(f, way) for f in features[5:]]
        centroids = np.stack(centroids)
        predictions = [np.argmin(((centroids - f) ** 2).sum(axis=1)) for f, _ in queries]
        accuracies.append(np.mean([p == way for p, (_, way) in zip(predictions, queries)]))
    assert np.mean(accuracies) > 0.4, accuracies


# --- atomic generation and the cache ---------------------------------------------------------------


def test_an_interrupted_generation_leaves_no_directory_ensure_mini_accepts(tmp_path, monkeypatch):
    target = tmp_path / "md_mini"
    write_records, calls = mini.write_records, []

    def interrupted_after_40_classes(path, payloads):
        calls.append(path)
        if len(calls) > 40:  # inside the second source
            raise Interrupted
        return write_records(path, payloads)

    monkeypatch.setattr(mini, "write_records", interrupted_after_40_classes)
    with pytest.raises(Interrupted):
        mini.ensure_mini(target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory

    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # a hard kill: no clean-up at all
    calls.clear()
    with pytest.raises(Interrupted):
        mini.ensure_mini(target)
    monkeypatch.undo()
    (leftover,) = tmp_path.iterdir()
    assert not target.exists() and leftover.name.startswith(".")
    with pytest.raises(DataError, match="not a complete mini benchmark"):
        mini.ensure_mini(leftover)


@pytest.mark.parametrize("damage", ["no manifest", "other version", "missing spec"])
def test_generate_refuses_a_directory_that_is_not_a_complete_copy(root, tmp_path, damage):
    target = tmp_path / "md_mini"
    shutil.copytree(root, target)
    if damage == "no manifest":
        (target / mini.MANIFEST).unlink()
    elif damage == "other version":
        manifest = {"version": mini.MINI_VERSION - 1, "sources": list(mini.MINI_SOURCES)}
        (target / mini.MANIFEST).write_text(json.dumps(manifest))
    else:
        (target / "mini_objects" / "dataset_spec.json").unlink()
    with pytest.raises(DataError, match="not a complete mini benchmark"):
        mini.generate(target)


def test_generate_returns_a_complete_copy_without_writing(root, monkeypatch):
    monkeypatch.setattr(mini, "_write_source", _write_source_raises)
    assert mini.generate(root) == root


def test_default_root_is_versioned_under_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(mini.CACHE_ENV, str(tmp_path))
    assert mini.default_mini_root() == tmp_path / f"mini-v{mini.MINI_VERSION}"
    monkeypatch.delenv(mini.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mini.default_mini_root() == tmp_path / "home" / ".cache" / "smat-bench" / f"mini-v{mini.MINI_VERSION}"


def test_ensure_mini_uses_the_copy_in_the_cache(root, tmp_path, monkeypatch):
    monkeypatch.setenv(mini.CACHE_ENV, str(tmp_path))
    cached = tmp_path / f"mini-v{mini.MINI_VERSION}"
    shutil.copytree(root, cached)
    monkeypatch.setattr(mini, "_write_source", _write_source_raises)
    assert mini.ensure_mini() == cached


def test_the_loser_of_a_race_keeps_the_winners_copy(root, tmp_path, monkeypatch):
    target = tmp_path / "md_mini"
    write_source = mini._write_source

    def other_process_finishes_first(source, directory, progress):
        if not target.exists():
            shutil.copytree(root, target)
            (target / "written-by-the-winner").touch()
        write_source(source, directory, progress)

    monkeypatch.setattr(mini, "_write_source", other_process_finishes_first)
    assert mini.ensure_mini(target) == target
    assert (target / "written-by-the-winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["md_mini"]  # the loser's temporary directory is gone


def test_cli_prints_one_summary_line_per_source(root, capsys):
    mini.main(["--out", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[: len(mini.MINI_SOURCES)]] == list(mini.MINI_SOURCES)
    assert "HierarchicalDatasetSpecification" in lines[mini.MINI_SOURCES.index("mini_objects")]
    assert "14/6/8" in lines[0] and "images" in lines[0]
