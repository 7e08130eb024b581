"""The decoded cache gives the episodes of the records, resumes its build, and refuses to be stale."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bytes

from benchmark.cache import DecodedCache, build_source, main, verify_source
from benchmark.episodes import BenchmarkData, SourceRecords, episode_loader
from benchmark.preprocess import IMAGENET_STD
from benchmark.records import encode_example, iter_records, write_records
from benchmark.run import build, parse_config
from registry.catalog import Benchmark, Source
from registry.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
COUNTS = (6, 5, 5)  # train / valid / test classes, 12 records each
REBUILD = "rebuild with: python -m benchmark.cache build toy --sources noise"


def noise(class_id, index):
    """Record ``index`` of class ``class_id``: uniform noise of 9..20 × 9..20 px, so resizing has work to do."""
    rng = np.random.default_rng([class_id, index])
    height, width = rng.integers(9, 21, size=2)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def toy_benchmark(resize="center_crop", normalization="imagenet", names=("noise",)):
    sources = tuple(Source(n, "id", "flat", dict(zip(("train", "valid", "test"), COUNTS)), 8, resize, normalization,
                           "generated") for n in names)
    return Benchmark("toy", "", "user", sources, sources, sources, (), 2, 3, 0, "paper")


@pytest.fixture
def records_root(write_source, tmp_path):
    write_source("noise", COUNTS, 12, draw=noise)
    return tmp_path


def build_cache(benchmark, records_root, cache_root, sources=None, workers=1):
    """Build the cache of ``sources`` (default: all) of ``benchmark``; return the summary lines."""
    data = BenchmarkData(benchmark, records_root)
    cache = DecodedCache(cache_root, benchmark.name, records_root)
    return [build_source(cache, data.source(name), workers) for name in sources or data.sources]


def verify_cache(benchmark, records_root, cache_root, per_class=None):
    data = BenchmarkData(benchmark, records_root)
    return verify_source(DecodedCache(cache_root, benchmark.name, records_root), data.source("noise"), per_class)


def episodes(data):
    """Training, validation and test episodes of the toy benchmark."""
    train = data.train_episodes(seed=1, num_episodes=3)
    return [train[i] for i in range(3)] + [data.eval_episodes("noise", s, num_episodes=2)[1] for s in ("valid", "test")]


@pytest.mark.parametrize(
    "resize, normalization", [("center_crop", "imagenet"), ("squash", "imagenet"), ("squash", "unit_range")]
)
def test_cached_episodes_are_the_decoded_episodes(resize, normalization, records_root, tmp_path):
    benchmark = toy_benchmark(resize, normalization)
    build_cache(benchmark, records_root, tmp_path / "decoded")
    plain_data = BenchmarkData(benchmark, records_root)
    cached_data = BenchmarkData(benchmark, records_root, decoded_cache=tmp_path / "decoded")
    plain, cached = episodes(plain_data), episodes(cached_data)
    # the same episodes by their digests exactly where the pixels are the same (not the rounded ones)
    same_digests = [plain_data.source("noise").episode_digest(a) == cached_data.source("noise").episode_digest(b)
                    for a, b in zip(plain, cached)]
    assert same_digests == [resize == "center_crop"] * len(plain)
    # Cached grey levels are exact under center_crop and rounded (|Δ| ≤ 0.5) under squash; normalisation
    # scales Δ by 1 / 127.5 (unit_range) or at most 1 / (255 · min std) (imagenet).
    scale = 1 / 127.5 if normalization == "unit_range" else 1 / (255 * min(IMAGENET_STD))
    bound = 0.0 if resize == "center_crop" else 0.5 * scale + 1e-6
    largest = 0.0
    for a, b in zip(plain, cached):
        assert a.id == b.id and a.description == b.description
        assert torch.equal(a.support_labels, b.support_labels) and torch.equal(a.query_labels, b.query_labels)
        np.testing.assert_array_equal(a.support_records, b.support_records)
        np.testing.assert_array_equal(a.query_records, b.query_records)
        for x, y in ((a.support_images, b.support_images), (a.query_images, b.query_images)):
            assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape
            largest = max(largest, float((x - y).abs().max()))
    assert largest <= bound
    if resize == "squash":
        assert largest > 0.5 * scale / 2  # the rounding is real: the check above is not vacuous


@pytest.mark.parametrize("cached", [False, True])
def test_images_are_the_records_preprocessed_one_by_one(cached, records_root, tmp_path):
    benchmark = toy_benchmark("center_crop")
    build_cache(benchmark, records_root, tmp_path / "decoded")
    data = BenchmarkData(benchmark, records_root, decoded_cache=tmp_path / "decoded" if cached else None)
    records = data.source("noise")
    indices = [7, 0, 11, 3]
    one_by_one = torch.stack([records.preprocess(noise(2, i)) for i in indices])  # PNG is lossless
    assert torch.equal(records.images(2, indices), one_by_one)
    assert records.images(2, []).shape == (0, 3, 8, 8)


def test_an_interrupted_build_resumes_and_a_rebuild_redoes_only_what_changed(records_root, tmp_path, monkeypatch):
    benchmark, cache_root = toy_benchmark(), tmp_path / "decoded"
    decoded, original = [], SourceRecords.pixels

    def counting(self, class_id, indices):
        if class_id == 5 and interrupt:
            raise RuntimeError("interrupted")
        decoded.append(class_id)
        return original(self, class_id, indices)

    monkeypatch.setattr(SourceRecords, "pixels", counting)
    interrupt = True
    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(benchmark, records_root, cache_root)
    directory = cache_root / "noise" / "center_crop-8"
    assert sorted(p.name for p in directory.glob("*.npy")) == [f"{c}.npy" for c in range(5)]
    assert not list(directory.glob("*.tmp")) and not (directory / "cache.json").exists()
    with pytest.raises(DataError, match=r"cache\.json: no decoded cache of source 'noise' \(never built, or its build "
                                        r"did not finish\); build it with: python -m benchmark.cache build toy"):
        BenchmarkData(benchmark, records_root, decoded_cache=cache_root)

    interrupt, decoded[:] = False, []
    (summary,) = build_cache(benchmark, records_root, cache_root)
    assert set(decoded) == set(range(5, 16)) and "16 classes (11 built, 5 up to date), 192 images" in summary
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.npy")}

    (directory / "9.npy").unlink()
    decoded[:] = []
    (summary,) = build_cache(benchmark, records_root, cache_root)
    assert set(decoded) == {9} and "(1 built, 15 up to date)" in summary
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in directory.glob("*.npy") if p.name != "9.npy")
    assert sorted(p.name for p in directory.iterdir()) == sorted([f"{c}.npy" for c in range(16)] + ["cache.json"])
    assert "192 of 192 cached images match their records (equal)" in verify_cache(benchmark, records_root, cache_root)


def _rewrite_class(path, class_id, count):
    """Replace a class file by ``count`` uniform grey PNGs: same count, other bytes and size."""
    write_records(path, (encode_example(png_bytes(np.full((10, 10, 3), i, np.uint8)), class_id) for i in range(count)))


@pytest.mark.parametrize(
    "fault, message",
    [
        ("pixel", r"noise/center_crop-8/3\.npy: record 4 differs from record 4 of \S+/noise/3\.tfrecords by 1 grey "
                  r"levels \(allowed: 0\); delete \S+/3\.npy and "),
        ("record_size", r"noise/2\.tfrecords changed since \S+/noise/center_crop-8/cache\.json was built \(its size "
                        r"or modification time differs: re-converted, or copied without its times\), so the cached "
                        r"pixels may not be its images; "),
        ("spec", r"noise/center_crop-8/cache\.json: built from another \S+/noise/dataset_spec\.json "
                 r"\(its SHA-256 changed\); "),
        ("missing", r"noise/center_crop-8/4\.npy: missing class file of the decoded cache of 'noise'; "),
        ("truncated", r"noise/center_crop-8/5\.npy: not a complete uint8 C-order array of shape \(12, 3, 8, 8\) "
                      r"of the decoded cache of 'noise'; "),
    ],
    ids=["pixel", "record_size", "spec", "missing", "truncated"],
)
def test_verify_names_the_first_fault_and_the_rebuild_that_fixes_it(fault, message, records_root, tmp_path):
    benchmark, cache_root = toy_benchmark(), tmp_path / "decoded"
    build_cache(benchmark, records_root, cache_root)
    directory = cache_root / "noise" / "center_crop-8"
    if fault == "pixel":
        array = np.load(directory / "3.npy", mmap_mode="r+")
        array[4, 1, 2, 3] ^= 1
        array.flush()
        del array
    elif fault == "record_size":
        _rewrite_class(records_root / "noise" / "2.tfrecords", 2, 12)
    elif fault == "spec":
        spec_file = records_root / "noise" / "dataset_spec.json"
        spec_file.write_text(spec_file.read_text().replace('"c3"', '"renamed"'))
    elif fault == "missing":
        (directory / "4.npy").unlink()
    else:
        _truncate(directory / "5.npy", 10)
    with pytest.raises(DataError) as error:
        verify_cache(benchmark, records_root, cache_root)
    assert re.search(message + re.escape(REBUILD), str(error.value)), str(error.value)

    if fault == "pixel":  # what the message says to do fixes it
        (directory / "3.npy").unlink()
    build_cache(benchmark, records_root, cache_root)
    assert "192 of 192" in verify_cache(benchmark, records_root, cache_root)


def test_records_changed_after_the_build_are_never_served_from_the_cache(records_root, tmp_path):
    """Reordered records (same count, same size) are refused until a build re-decodes their class; records
    whose times alone changed (a copy without them) are refused until a build, which decodes nothing."""
    benchmark, cache_root = toy_benchmark(), tmp_path / "decoded"
    build_cache(benchmark, records_root, cache_root)
    path = records_root / "noise" / "1.tfrecords"
    payloads = list(iter_records(path))
    write_records(path, reversed(payloads))
    assert path.stat().st_size == sum(len(p) + 16 for p in payloads)
    with pytest.raises(DataError, match=r"1\.tfrecords changed since .* " + re.escape(REBUILD)):
        BenchmarkData(benchmark, records_root, decoded_cache=cache_root)
    assert "(1 built, 15 up to date)" in build_cache(benchmark, records_root, cache_root)[0]
    data = BenchmarkData(benchmark, records_root, decoded_cache=cache_root)
    assert torch.equal(data.source("noise").decoded.pixels(1, [0]).float(),
                       BenchmarkData(benchmark, records_root).source("noise").pixels(1, [0]))

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the same records, touched
    with pytest.raises(DataError, match=r"1\.tfrecords changed since"):
        BenchmarkData(benchmark, records_root, decoded_cache=cache_root)
    assert "(0 built, 16 up to date)" in build_cache(benchmark, records_root, cache_root)[0]
    BenchmarkData(benchmark, records_root, decoded_cache=cache_root)


def test_a_format_1_cache_is_upgraded_by_a_build_that_decodes_nothing(records_root, tmp_path):
    benchmark, cache_root = toy_benchmark(), tmp_path / "decoded"
    build_cache(benchmark, records_root, cache_root)
    meta_file = cache_root / "noise" / "center_crop-8" / "cache.json"
    meta = json.loads(meta_file.read_text())
    old = {**meta, "format": 1, "classes": {c: {"bytes": e["bytes"], "records": e["records"]} for c, e in meta["classes"].items()}}
    meta_file.write_text(json.dumps(old))
    with pytest.raises(DataError, match=r"format is 1, expected 2; " + re.escape(REBUILD)):
        BenchmarkData(benchmark, records_root, decoded_cache=cache_root)
    assert "(0 built, 16 up to date)" in build_cache(benchmark, records_root, cache_root)[0]
    assert json.loads(meta_file.read_text()) == meta


def _truncate(path, nbytes):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - nbytes)


def test_a_class_file_cut_short_after_it_was_checked_names_the_record(records_root, tmp_path):
    benchmark, cache_root = toy_benchmark(), tmp_path / "decoded"
    build_cache(benchmark, records_root, cache_root)
    data = BenchmarkData(benchmark, records_root, decoded_cache=cache_root)
    decoded = data.source("noise").decoded
    first = decoded.pixels(5, [11, 0])  # the class file is checked and its pixel offset kept
    _truncate(decoded.class_path(5), 10)
    assert torch.equal(decoded.pixels(5, [0]), first[1:])
    with pytest.raises(DataError, match=r"5\.npy: record 11 is cut short; " + re.escape(REBUILD)):
        decoded.pixels(5, [0, 11])


def test_verify_per_class_re_decodes_k_records_of_each_class(records_root, tmp_path):
    build_cache(toy_benchmark("squash"), records_root, tmp_path / "decoded")
    summary = verify_cache(toy_benchmark("squash"), records_root, tmp_path / "decoded", per_class=3)
    assert re.fullmatch(r"noise: 16 classes, 48 of 192 cached images match their records \(within 0\.5 grey level\) "
                        r"in \d+\.\d s", summary)


def test_benchmark_data_refuses_a_cache_that_lacks_a_source(write_source, records_root, tmp_path):
    write_source("other", COUNTS, 12)
    benchmark = toy_benchmark(names=("noise", "other"))
    build_cache(benchmark, records_root, tmp_path / "decoded", sources=["noise"])
    with pytest.raises(DataError, match=r"other/center_crop-8/cache\.json: no decoded cache of source 'other' .*"
                                        r"build it with: python -m benchmark\.cache build toy --sources other"):
        BenchmarkData(benchmark, records_root, decoded_cache=tmp_path / "decoded")


def test_a_cache_of_another_resize_or_size_is_not_used(records_root, tmp_path):
    build_cache(toy_benchmark("squash"), records_root, tmp_path / "decoded")
    with pytest.raises(DataError, match=r"noise/center_crop-8/cache\.json: no decoded cache of source 'noise'"):
        BenchmarkData(toy_benchmark("center_crop"), records_root, decoded_cache=tmp_path / "decoded")


def test_worker_processes_read_the_same_episodes_from_the_cache(records_root, tmp_path):
    benchmark = toy_benchmark()
    build_cache(benchmark, records_root, tmp_path / "decoded")
    plain = BenchmarkData(benchmark, records_root).eval_episodes("noise", "test", num_episodes=3)
    cached = BenchmarkData(benchmark, records_root, decoded_cache=tmp_path / "decoded").eval_episodes(
        "noise", "test", num_episodes=3)
    pairs = list(zip(episode_loader(plain, num_workers=0), episode_loader(cached, num_workers=2)))
    assert len(pairs) == 3
    for a, b in pairs:
        assert torch.equal(a.support_images, b.support_images) and torch.equal(a.query_images, b.query_images)
        np.testing.assert_array_equal(a.query_records, b.query_records)


def test_cli_builds_with_workers_and_verifies_with_one_summary_line_per_source(mini_root, tmp_path, capsys):
    cache = tmp_path / "decoded"
    result = subprocess.run(
        [sys.executable, "-m", "benchmark.cache", "build", "md_mini", "--sources", "mini_digits", "mini_sketch",
         "--records", str(mini_root), "--cache", str(cache), "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"mini_digits: 10 classes \(10 built, 0 up to date\), 285 images, \d+\.\d MiB in \S+, \d+\.\d s\n"
        r"mini_sketch: 12 classes \(12 built, 0 up to date\), 369 images, \d+\.\d MiB in \S+, \d+\.\d s\n",
        result.stdout,
    )
    main(["verify", "md_mini", "--sources", "mini_digits", "--records", str(mini_root), "--cache", str(cache)])
    assert re.fullmatch(r"mini_digits: 10 classes, 285 of 285 cached images match their records \(equal\) "
                        r"in \d+\.\d s\n", capsys.readouterr().out)

    array = np.load(cache / "mini_digits" / "center_crop-32" / "7.npy", mmap_mode="r+")
    array[0, 0, 0, 0] ^= 0x80
    array.flush()
    del array
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "md_mini", "--sources", "mini_digits", "--records", str(mini_root), "--cache", str(cache)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert re.search(r"^python -m benchmark\.cache: error: \S+/mini_digits/center_crop-32/7\.npy: record 0 differs .*"
                     r"rebuild with: python -m benchmark\.cache build md_mini --sources mini_digits", err), err


def test_run_decoded_cache_binding_reaches_the_benchmark_data(mini_root, tmp_path):
    config = parse_config(["methods/pre.gin"], [f'run.decoded_cache = "{tmp_path}"'])
    assert config.decoded_cache == str(tmp_path)
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}/mini_shapes/center_crop-32/cache\.json: "
                                        r"no decoded cache of source 'mini_shapes'"):
        build(config)


@pytest.mark.parametrize("fault", ["missing", "truncated"])
def test_a_run_checks_every_cached_class_file_before_it_starts(fault, records_root, tmp_path):
    benchmark, cache_root = toy_benchmark(), tmp_path / "decoded"
    build_cache(benchmark, records_root, cache_root)
    data = BenchmarkData(benchmark, records_root, decoded_cache=cache_root)
    assert re.fullmatch(r"checked 16 decoded-cache files \(shape\) of noise: 192 records in \d+\.\d\d s", data.check())
    path = cache_root / "noise" / "center_crop-8" / "5.npy"
    path.unlink() if fault == "missing" else _truncate(path, 10)
    what = "missing class file" if fault == "missing" else r"not a complete uint8 C-order array of shape \(12, 3, 8, 8\)"
    with pytest.raises(DataError, match=rf"5\.npy: {what} of the decoded cache of 'noise'; " + re.escape(REBUILD)):
        BenchmarkData(benchmark, records_root, decoded_cache=cache_root).check()
