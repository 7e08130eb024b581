"""The episode sampler against the official goldens, its invariants, its distribution and its errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import Split, load_dataset_spec
from registry.errors import DataError
from registry.sampling import EpisodeDescriptionSampler, sample_num_support_per_class

SHARED_PARENT = Path(__file__).resolve().parents[1] / "data"  # the directory holding the snapshot of shared/
SAMPLER_DIR = SHARED_PARENT / "shared" / "conformance" / "sampler"
SPECS_DIR = SHARED_PARENT / "shared" / "conformance" / "specs"
MANIFEST = json.loads((SAMPLER_DIR / "manifest.json").read_text())


def spec_of(name):
    if name == "toy":
        return load_dataset_spec(SAMPLER_DIR / "toy")
    return load_dataset_spec(SPECS_DIR / name)


def sample(spec, split, config=None, seed=0, n=1):
    sampler = EpisodeDescriptionSampler.from_seed(spec, split, config or EpisodeDescriptionConfig(), seed)
    return [sampler.sample_episode_description() for _ in range(n)]


# --- bit-exact goldens ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", MANIFEST["files"], ids=[e["file"] for e in MANIFEST["files"]])
def test_descriptions_equal_official_golden(entry):
    spec = load_dataset_spec(SHARED_PARENT / entry["spec"])
    config = EpisodeDescriptionConfig().replace(**entry["config_overrides"])
    expected = [json.loads(line) for line in (SAMPLER_DIR / entry["file"]).read_text().splitlines()]
    got = sample(spec, entry["split"], config, entry["seed"], entry["n_episodes"])
    assert [[list(t) for t in episode] for episode in got] == expected


@pytest.mark.parametrize("seed, instance_seed", [(0, 2357136044), (1, 1791095845)])
def test_instance_seed_is_one_uint32_draw_of_the_module_rng(seed, instance_seed):
    spec = spec_of("toy")
    ours = EpisodeDescriptionSampler.from_seed(spec, "train", EpisodeDescriptionConfig(), seed)
    reference = EpisodeDescriptionSampler(
        spec, "train", EpisodeDescriptionConfig(), rng=np.random.RandomState(instance_seed)
    )
    assert [ours.sample_episode_description() for _ in range(5)] == [
        reference.sample_episode_description() for _ in range(5)
    ]


def test_documented_spot_values():
    toy = spec_of("toy")
    assert sample(toy, "train", seed=0, n=3)[2] == (
        (16, 73, 10), (18, 72, 10), (17, 40, 10), (1, 7, 10), (19, 100, 10), (5, 19, 10), (6, 28, 10), (10, 31, 10), (3, 17, 10)
    )
    assert sample(toy, "train", seed=1, n=1)[0][:3] == ((9, 25, 7), (11, 27, 7), (5, 19, 7))


# --- specs ---------------------------------------------------------------------------------------

ALL_SPECS = sorted(p.name for p in SPECS_DIR.iterdir() if (p / "dataset_spec.json").is_file())


@pytest.mark.parametrize("name", ALL_SPECS)
def test_every_reference_spec_loads_and_round_trips(name):
    original = json.loads((SPECS_DIR / name / "dataset_spec.json").read_text())
    spec = load_dataset_spec(SPECS_DIR / name)
    assert type(spec).from_dict(spec.to_dict()) == spec
    dumped = spec.to_dict()
    assert {k: v for k, v in dumped.items() if k != "path"} == {k: v for k, v in original.items() if k != "path"}
    assert spec.path == str(SPECS_DIR / name)


@pytest.mark.parametrize(
    "name, counts",
    [("ilsvrc_2012", (712, 158, 130)), ("omniglot", (883, 81, 659)), ("fungi", (994, 200, 200)), ("traffic_sign", (0, 0, 43))],
)
def test_split_class_counts_follow_the_official_spec(name, counts):
    spec = spec_of(name)
    assert tuple(spec.classes_per_split[s] for s in Split) == counts
    assert spec.get_classes(Split.TEST) == range(counts[0] + counts[1], sum(counts))


def test_dag_has_113_18_15_eligible_nodes_covering_every_leaf():
    spec = spec_of("ilsvrc_2012")
    for split, n_nodes in zip(Split, (113, 18, 15)):
        sampler = EpisodeDescriptionSampler.from_seed(spec, split, EpisodeDescriptionConfig(), 0)
        assert len(sampler.span_leaves_rel) == n_nodes
        covered = set().union(*map(set, sampler.span_leaves_rel))
        assert covered == set(range(spec.classes_per_split[split]))


# --- invariants, under the default config and its variants (meta-dataset's subclassing habit) ----


class TestInvariants:
    """Every episode of every (spec, split) satisfies the sampler's guarantees."""

    config = EpisodeDescriptionConfig()
    cases = [("toy", "train"), ("toy", "valid"), ("toy", "test"), ("aircraft", "train"), ("fungi", "test"),
             ("omniglot", "train"), ("omniglot", "test"), ("ilsvrc_2012", "train"), ("ilsvrc_2012", "test")]
    episodes = 300

    @pytest.fixture(params=cases, ids=lambda c: f"{c[0]}-{c[1]}")
    def drawn(self, request):
        name, split = request.param
        spec = spec_of(name)
        if not self.applies(spec, Split.parse(split)):
            pytest.skip("config does not apply to this source or split")
        return spec, Split.parse(split), sample(spec, split, self.config, seed=7, n=self.episodes)

    def applies(self, spec, split):
        return True

    def test_class_ids_unique_and_inside_the_split(self, drawn):
        spec, split, episodes = drawn
        n_split = spec.classes_per_split[split]
        for episode in episodes:
            ids = [c for c, _, _ in episode]
            assert len(set(ids)) == len(ids)
            assert all(0 <= c < n_split for c in ids)

    def test_ways_within_bounds(self, drawn):
        spec, split, episodes = drawn
        for episode in episodes:
            if self.config.num_ways is not None:
                assert len(episode) == self.config.num_ways
            else:
                assert self.config.min_ways <= len(episode) <= self.config.max_ways_upper_bound

    def test_one_query_size_for_every_class(self, drawn):
        spec, split, episodes = drawn
        offset = spec.split_offset(split)
        for episode in episodes:
            queries = {q for _, _, q in episode}
            assert len(queries) == 1
            (q,) = queries
            sizes = [spec.get_total_images_per_class(offset + c) for c, _, _ in episode]
            if self.config.num_query is not None:
                assert q == self.config.num_query
            elif self.config.num_support is None:
                assert q == min(self.config.max_num_query, min(n // 2 for n in sizes))

    def test_shots_leave_the_query_and_respect_the_support_cap(self, drawn):
        spec, split, episodes = drawn
        offset = spec.split_offset(split)
        for episode in episodes:
            for c, k, q in episode:
                assert 1 <= k <= spec.get_total_images_per_class(offset + c) - q
            if self.config.num_support is None:
                assert len(episode) <= sum(k for _, k, _ in episode) <= self.config.max_support_set_size
            elif isinstance(self.config.num_support, int):
                assert {k for _, k, _ in episode} == {self.config.num_support}


class TestInvariantsFixedWayShot(TestInvariants):
    config = EpisodeDescriptionConfig(num_ways=5, num_support=5, num_query=15, min_examples_in_class=20)

    def applies(self, spec, split):
        """Flat sources whose split has at least 5 classes of 20 images (toy VALID and TEST do not)."""
        flat = not hasattr(spec, "classes_per_superclass") and not hasattr(spec, "split_subgraphs")
        big = [c for c in spec.get_classes(split) if spec.get_total_images_per_class(c) >= 20]
        return flat and len(big) >= 5


class TestInvariantsFixedShotIgnoringOntologies(TestInvariants):
    config = EpisodeDescriptionConfig(num_support=1, ignore_dag_ontology=True, ignore_bilevel_ontology=True)


class TestInvariantsSupportRange(TestInvariants):
    config = EpisodeDescriptionConfig(num_support=(2, 4), ignore_dag_ontology=True, ignore_bilevel_ontology=True)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_bilevel_episodes_stay_within_one_alphabet(split):
    spec = spec_of("omniglot")
    offset = spec.split_offset(split)
    bounds = [(spec.class_offset_of_superclass(a), spec.classes_per_superclass[a]) for a in spec.get_superclasses(split)]
    for episode in sample(spec, split, seed=7, n=300):
        homes = {next(i for i, (first, m) in enumerate(bounds) if first <= offset + c < first + m) for c, _, _ in episode}
        assert len(homes) == 1


def test_fixed_shot_query_is_the_smallest_class_minus_the_shots():
    spec = spec_of("toy")
    config = EpisodeDescriptionConfig(num_support=5)
    for episode in sample(spec, "train", config, seed=3, n=200):
        sizes = [spec.get_total_images_per_class(c) for c, _, _ in episode]
        assert {q for _, _, q in episode} == {min(10, min(sizes) - 5)}


def test_min_examples_in_class_filters_small_classes():
    spec = spec_of("toy")
    config = EpisodeDescriptionConfig(num_ways=5, num_support=5, num_query=15, min_examples_in_class=20)
    drawn = {c for episode in sample(spec, "train", config, seed=0, n=500) for c, _, _ in episode}
    assert 0 not in drawn and drawn == set(range(1, 20))


# --- distribution (analytic values of the reference test plan, ±4 standard errors) ---------------


def test_toy_train_ways_and_query_follow_the_analytic_distribution():
    episodes = sample(spec_of("toy"), "train", seed=11, n=20000)
    ways = np.array([len(e) for e in episodes])
    query_7 = np.mean([e[0][2] == 7 for e in episodes])
    assert abs(ways.mean() - 12.5) < 4 * math.sqrt(21.25 / len(ways))
    assert abs(query_7 - 0.625) < 4 * math.sqrt(0.625 * 0.375 / len(ways))
    assert set(np.unique(ways)) == set(range(5, 21))


def test_omniglot_ways_follow_the_alphabet_mixture():
    """W = U{5..min(50, m_a)} for a uniformly chosen alphabet a: E[W] = mean_a (5 + min(50, m_a)) / 2."""
    spec = spec_of("omniglot")
    sizes = [min(50, spec.classes_per_superclass[a]) for a in spec.get_superclasses("train")]
    mean = np.mean([(5 + m) / 2 for m in sizes])
    var = np.mean([((m - 4) ** 2 - 1) / 12 + ((5 + m) / 2) ** 2 for m in sizes]) - mean**2
    ways = np.array([len(e) for e in sample(spec, "train", seed=5, n=5000)])
    assert abs(ways.mean() - mean) < 4 * math.sqrt(var / len(ways))


def test_shot_weights_use_total_images_and_guarantee_one_shot():
    rng = np.random.RandomState(0)
    shots = sample_num_support_per_class(np.array([100, 10]), np.array([90, 5]), 50, -0.7, 0.7, rng=rng)
    assert shots[0] > shots[1] >= 1 and shots[1] <= 5


# --- errors: the official messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, split, overrides, message",
    [
        ("traffic_sign", "train", {}, '"min_ways" is set to 5, but split Split.TRAIN of dataset traffic_sign only has 0 classes'),
        ("omniglot", "train", {"num_ways": 5}, '"use_bilevel_hierarchy" is incompatible with "num_ways".'),
        ("omniglot", "train", {"min_examples_in_class": 2}, '"use_bilevel_hierarchy" is incompatible with "min_examples_in_class".'),
        ("omniglot", "valid", {"min_ways": 15}, "Superclass: 25 has num_classes=14 < min_ways=15."),
        ("ilsvrc_2012", "test", {"num_ways": 5}, '"use_dag_hierarchy" is incompatible with "num_ways".'),
        ("ilsvrc_2012", "train", {"min_ways": 393}, "There are no classes eligible for participating in episodes."),
    ],
)
def test_construction_rejects_what_the_official_sampler_rejects(name, split, overrides, message):
    with pytest.raises(ValueError) as err:
        EpisodeDescriptionSampler.from_seed(spec_of(name), split, EpisodeDescriptionConfig().replace(**overrides), 0)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_ways": 5, "num_support": 5, "num_query": 15}, "Some classes do not have enough examples."),
        ({"num_support": 15}, "Expected at least 16 images per class"),
        ({"max_support_set_size": 4}, "max_support_set_size is too small to have at least one support example per class."),
        ({"num_query": 15}, "Some classes have no remaining examples."),
        ({"num_support": (2, 14), "num_query": 10}, "The range provided for uniform sampling of the number of support examples per class is not valid"),
        ({"num_ways": 25}, "Cannot take a larger sample than population when 'replace=False'"),
    ],
)
def test_sampling_rejects_what_the_official_sampler_rejects(overrides, message):
    sampler = EpisodeDescriptionSampler.from_seed(spec_of("toy"), "train", EpisodeDescriptionConfig().replace(**overrides), 0)
    with pytest.raises(ValueError) as err:
        for _ in range(500):
            sampler.sample_episode_description()
    assert message in str(err.value)


def test_config_rejects_unknown_fields_and_bad_ranges():
    with pytest.raises(DataError, match="unknown episode config field"):
        EpisodeDescriptionConfig().replace(num_way=5)
    with pytest.raises(DataError, match="0 < lo <= hi"):
        EpisodeDescriptionConfig(num_support=(5, 2))
