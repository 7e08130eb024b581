"""Episodes are pure functions of their identity, follow the official descriptions, and never repeat an image."""

import re
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import pixel_code, png_bytes

from benchmark.episodes import BenchmarkData, EpisodeId, episode_loader
from benchmark.records import decode_example, encode_example, iter_records, write_records
from methods import Task
from benchmark.preprocess import IMAGENET_MEAN, IMAGENET_STD
from registry.catalog import Benchmark, Source
from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import Split, load_dataset_spec
from registry.errors import DataError
from registry.sampling import EpisodeDescriptionSampler

TRAIN_SIZES = [15, 21, 26, 32, 37, 43, 48, 54, 59, 65]


def source(name, counts, role="id"):
    return Source(name, role, "flat", dict(zip(("train", "valid", "test"), counts)), 8, "center_crop", "imagenet",
                  "generated")


@pytest.fixture
def bench(write_source, tmp_path):
    """Two flat sources: 'alpha' (10/6/7 classes of 15..65 images) and 'beta' (8/5/6 classes of 30)."""
    write_source("alpha", (10, 6, 7), TRAIN_SIZES + [40] * 13)
    write_source("beta", (8, 5, 6), 30)
    alpha, beta = source("alpha", (10, 6, 7)), source("beta", (8, 5, 6))
    benchmark = Benchmark("toy_bench", "", "user", (alpha, beta), (alpha, beta), (alpha, beta), (), 4, 6, 0, "paper")
    return BenchmarkData(benchmark, tmp_path)


def decoded_codes(images):
    """Undo ImageNet normalisation and read back each uniform image's colour."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (images * std + mean) * 255
    return [tuple(int(round(v)) for v in p[:, 0, 0].tolist()) for p in pixels]


def test_description_is_the_official_stream_element(bench, tmp_path):
    episodes = bench.eval_episodes("alpha", "test", seed=3, num_episodes=6)
    sampler = EpisodeDescriptionSampler.from_seed(load_dataset_spec(tmp_path / "alpha"), "test", EpisodeDescriptionConfig(), 3)
    expected = [sampler.sample_episode_description() for _ in range(6)]
    assert [episodes[i].description for i in (5, 0, 3, 1, 2, 4)] == [expected[i] for i in (5, 0, 3, 1, 2, 4)]


def test_labels_follow_description_order_with_k_support_and_q_query(bench):
    episode = bench.eval_episodes("alpha", "train", num_episodes=3)[2]
    support, query = Counter(episode.support_labels.tolist()), Counter(episode.query_labels.tolist())
    for label, (rel_id, k, q) in enumerate(episode.description):
        assert support[label] == k and query[label] == q
        rows = episode.support_records[episode.support_labels.numpy() == label]
        assert set(rows[:, 0]) == {rel_id}  # the TRAIN split starts at absolute id 0


def test_no_image_appears_twice_within_an_episode(bench):
    for split in ("train", "valid", "test"):
        for episode in bench.eval_episodes("alpha", split, num_episodes=6):
            rows = np.concatenate([episode.support_records, episode.query_records])
            assert len({tuple(r) for r in rows}) == len(rows)


def test_images_are_the_records_the_episode_names(bench):
    episode = bench.eval_episodes("beta", "test", num_episodes=1)[0]
    for images, records in ((episode.support_images, episode.support_records), (episode.query_images, episode.query_records)):
        assert decoded_codes(images) == [pixel_code(c, i) for c, i in records]
    assert episode.support_images.shape[1:] == (3, 8, 8) and episode.support_images.dtype == torch.float32
    assert episode.support_records[:, 0].min() >= 8 + 5  # TEST ids follow TRAIN and VALID


def test_episodes_carry_uint8_pixels_and_normalise_them_where_they_go(bench):
    """Under center_crop the resized grey levels are integers: episodes carry them as uint8 (a quarter of float32)."""
    episode = bench.eval_episodes("beta", "test", num_episodes=1)[0]
    assert episode.support_pixels.dtype == torch.uint8 and episode.query_pixels.dtype == torch.uint8
    plain = bench.source("beta").pixels(int(episode.query_records[0, 0]), episode.query_records[:1, 1])
    assert torch.equal(episode.query_pixels[:1].float(), plain)  # the conversion loses nothing
    task = Task.from_episode(episode)
    assert torch.equal(task.support_x, episode.support_images) and torch.equal(task.query_x, episode.query_images)
    assert torch.equal(task.query_x[:1], episode.preprocess.normalize(plain))


def test_episode_is_a_pure_function_of_its_identity(bench, tmp_path):
    first = bench.eval_episodes("alpha", "valid", num_episodes=4)[3]
    rebuilt = BenchmarkData(bench.benchmark, tmp_path).eval_episodes("alpha", "valid", num_episodes=4)[3]
    assert first.id == rebuilt.id == EpisodeId("toy_bench", "alpha", "valid", 0, 3)
    assert torch.equal(first.support_images, rebuilt.support_images) and torch.equal(first.query_images, rebuilt.query_images)
    np.testing.assert_array_equal(first.query_records, rebuilt.query_records)


def test_the_episode_digest_names_the_images_by_content(bench, tmp_path):
    """Equal for an episode rebuilt elsewhere; different for another episode, and for the same episode once
    one record of one of its classes has other bytes (a re-conversion that keeps every count)."""
    digest = lambda data, e: data.source("alpha").episode_digest(data.eval_episodes("alpha", "test")[e])  # noqa: E731
    first = digest(bench, 0)
    assert len(first) == 16 and digest(BenchmarkData(bench.benchmark, tmp_path), 0) == first
    assert digest(bench, 1) != first
    episode = bench.eval_episodes("alpha", "test")[0]
    class_id, index = (int(v) for v in episode.query_records[-1])
    path = tmp_path / "alpha" / f"{class_id}.tfrecords"
    payloads = list(iter_records(path))
    _, label = decode_example(payloads[index])
    payloads[index] = encode_example(png_bytes(np.full((12, 10, 3), 7, np.uint8)), label)
    write_records(path, payloads)
    assert digest(BenchmarkData(bench.benchmark, tmp_path), 0) != first


def test_different_identities_pick_different_images():
    a, b = (EpisodeId("b", "s", "test", 0, e).image_rng().choice(1000, 50, replace=False) for e in (0, 1))
    assert not np.array_equal(a, b)


def test_worker_processes_give_the_same_episodes(bench):
    episodes = bench.eval_episodes("alpha", "test", num_episodes=4)
    alone = [e.query_records for e in episode_loader(episodes, num_workers=0)]
    parallel = [e.query_records for e in episode_loader(episodes, num_workers=2)]
    assert all(np.array_equal(a, p) for a, p in zip(alone, parallel)) and len(parallel) == 4


def test_training_sources_are_drawn_uniformly(bench):
    stream = bench.train_episodes(seed=1, num_episodes=4000)
    choice, _ = stream._schedule
    share = np.bincount(choice, minlength=2) / len(choice)
    assert np.all(np.abs(share - 0.5) < 4 * np.sqrt(0.25 / len(choice)))


def test_resumed_training_stream_continues_exactly(bench):
    whole = bench.train_episodes(seed=5, num_episodes=12)
    resumed = bench.train_episodes(seed=5, num_episodes=4, start=8)
    for i in range(4):
        a, b = whole[8 + i], resumed[i]
        assert a.id == b.id and a.description == b.description
        np.testing.assert_array_equal(a.support_records, b.support_records)


def test_training_descriptions_are_each_sources_official_stream_in_order(bench):
    stream = bench.train_episodes(seed=2, num_episodes=30)
    episodes = [stream[i] for i in range(30)]
    module_rng = np.random.RandomState(2)
    for name in ("alpha", "beta"):
        sampler = EpisodeDescriptionSampler(
            bench.source(name).spec, "train", EpisodeDescriptionConfig(),
            rng=np.random.RandomState(module_rng.randint(0, 2**32, dtype="uint32")),
        )
        mine = [e.description for e in episodes if e.id.source == name]
        assert mine == [sampler.sample_episode_description() for _ in mine]


def test_missing_class_file_names_the_file_and_the_fix(bench, tmp_path):
    (tmp_path / "beta" / "14.tfrecords").unlink()
    episodes = bench.eval_episodes("beta", "test", num_episodes=50)
    with pytest.raises(DataError, match=r"beta/14.tfrecords: missing class file of source 'beta'"):
        for i in range(50):
            episodes[i]


def test_record_count_disagreeing_with_the_spec_is_reported(bench, tmp_path, write_source):
    spec_file = tmp_path / "beta" / "dataset_spec.json"
    spec_file.write_text(spec_file.read_text().replace('"13": 30', '"13": 31'))
    fresh = BenchmarkData(bench.benchmark, tmp_path)
    with pytest.raises(DataError, match=r"13.tfrecords: 30 records, dataset_spec.json says 31"):
        for i in range(50):
            fresh.eval_episodes("beta", "test", num_episodes=50)[i]


def _cut(path, keep):
    """Keep the first ``keep`` bytes of ``path``."""
    path.write_bytes(path.read_bytes()[:keep])


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _record_start(path, i):
    return sum(len(p) + 16 for p in list(iter_records(path))[:i])


def test_broken_framing_names_the_file_record_byte_and_the_sources_fix(bench, tmp_path):
    path = tmp_path / "beta" / "14.tfrecords"
    start = _record_start(path, 3)
    _flip(path, start)  # the length of record 3
    with pytest.raises(DataError, match=rf"beta/14.tfrecords: record 3: length CRC mismatch in the record header at "
                                        rf"byte {start} \(corrupt framing\); delete the directory and let smat-bench"):
        bench.source("beta").pixels(14, [0])


DAMAGES = {  # (damage to beta/14.tfrecords, 30 records; what the error says)
    "framing": (lambda p: _flip(p, _record_start(p, 3)),
                lambda p: rf"record 3: length CRC mismatch in the record header at byte {_record_start(p, 3)} "),
    "truncated": (lambda p: _cut(p, p.stat().st_size - 10),
                  lambda p: rf"record 29: file truncated \(the record at byte {_record_start(p, 29)} needs"),
    "count": (lambda p: _cut(p, _record_start(p, 29)), lambda p: "29 records, dataset_spec.json says 30"),
    "missing": (lambda p: p.unlink(), lambda p: "missing class file of source 'beta'"),
}


@pytest.mark.parametrize("fault", DAMAGES)
def test_check_finds_a_bad_class_file_before_any_episode_and_names_it_and_the_fix(bench, tmp_path, fault):
    summary = r"checked 42 record files \(framing, record count\) of alpha, beta: 1490 records in \d+\.\d\d s"
    assert re.fullmatch(summary, bench.check())
    path, (damage, message) = tmp_path / "beta" / "14.tfrecords", DAMAGES[fault]
    message = f"{re.escape(str(path))}: {message(path)}.*; delete the directory and let smat-bench regenerate it"
    damage(path)
    with pytest.raises(DataError, match=message):
        BenchmarkData(bench.benchmark, tmp_path).check()


def test_check_reads_only_the_splits_a_run_reads(write_source, tmp_path):
    write_source("alpha", (10, 6, 7), 20)
    write_source("beta", (8, 5, 6), 20)
    alpha, beta = source("alpha", (10, 6, 7)), source("beta", (8, 5, 6))
    benchmark = Benchmark("toy_roles", "", "user", (alpha,), (alpha,), (beta,), (), 4, 6, 0, "paper")
    data = BenchmarkData(benchmark, tmp_path)
    assert data.splits_read(train=True, evaluate=False) == {"alpha": [Split.TRAIN, Split.VALID]}
    assert data.splits_read(train=False, evaluate=True) == {"beta": [Split.TEST, Split.VALID], "alpha": [Split.VALID]}
    _cut(tmp_path / "alpha" / "0.tfrecords", 100)  # a TRAIN class: read by meta-training only
    _cut(tmp_path / "beta" / "18.tfrecords", 100)  # a TEST class: read by meta-testing only
    with pytest.raises(DataError, match=r"alpha/0.tfrecords: record 0: file truncated"):
        BenchmarkData(benchmark, tmp_path).check(train=True, evaluate=False)
    with pytest.raises(DataError, match=r"beta/18.tfrecords: record 0: file truncated"):
        BenchmarkData(benchmark, tmp_path).check(train=False, evaluate=True)
    assert "checked 0 record files" in BenchmarkData(benchmark, tmp_path).check(train=False, evaluate=False)


def test_sampler_error_names_benchmark_source_split_and_episode(write_source, tmp_path):
    write_source("tiny", (0, 0, 5), [3, 3, 3, 3, 3])
    tiny = source("tiny", (0, 0, 5), role="ood")
    bench = Benchmark("t", "", "user", (), (), (tiny,), (), 0, 2, 0, "paper",
                      eval_episode_config={"num_support": 5})
    with pytest.raises(DataError, match=r"benchmark 't', source 'tiny', split test, seed 0, episode 0: Expected at least 6"):
        BenchmarkData(bench, tmp_path).eval_episodes("tiny", "test")[0]


def test_unknown_source_of_a_benchmark_is_rejected(bench):
    with pytest.raises(DataError, match="does not use source 'gamma'; it uses alpha, beta"):
        bench.source("gamma")


def test_every_md_mini_source_matches_its_declaration_and_gives_episodes(mini_root):
    data = BenchmarkData("md_mini", mini_root)
    for test_source in data.benchmark.test_sources:
        episode = data.eval_episodes(test_source.name, "test", num_episodes=1)[0]
        assert episode.support_images.shape[1:] == (3, 32, 32) and episode.ways >= 5
    for valid_source in data.benchmark.valid_sources:
        assert data.eval_episodes(valid_source.name, "valid", num_episodes=1)[0].ways >= 5
    stream = data.train_episodes(seed=0, num_episodes=16)
    assert {stream[i].id.source for i in range(16)} == {s.name for s in data.benchmark.train_sources}
