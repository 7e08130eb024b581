"""registry.convert: each raw layout converts to sound, declared, sampleable records, safely and deterministically.

Every test fabricates tiny raw data sets in the layouts torchvision (and DomainNet) use; nothing is
downloaded. A writer returns (RAW_DIR to pass, class names in id order, per class its originals in
record order: a pixel array or the image file).
"""

import hashlib
import io
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
from conftest import planted_pickle
from PIL import Image

import registry.convert as convert_module
from benchmark.records import RecordFile, decode_image, verify_source
from registry.catalog import get_source, list_sources
from registry.config import EpisodeDescriptionConfig
from registry.convert import DOMAINNET_SPLITS_FILE, convert, list_converters
from registry.dataset_spec import Split, load_dataset_spec
from registry.errors import DataError
from registry.sampling import EpisodeDescriptionSampler

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- raw layouts ---------------------------------------------------------------------------------


def _num_classes(name):
    return sum(get_source(name).classes.values())


def _sizes(name):
    """2 or 3 images per class, so per-class counts are checked too."""
    return [2 + c % 2 for c in range(_num_classes(name))]


def _pixels(rng, shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _encoded(rng, fmt, size=(7, 5)):
    buffer = io.BytesIO()
    Image.fromarray(_pixels(rng, (size[1], size[0], 3))).save(buffer, format=fmt)
    return buffer.getvalue()


def _shuffled_labels(sizes, rng):
    """Labels of all images, classes interleaved: the converter must group them."""
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


def _by_class(labels, items, num_classes):
    return [[item for label, item in zip(labels, items) if label == c] for c in range(num_classes)]


def write_mnist(raw, sizes):
    rng = np.random.default_rng(0)
    labels = _shuffled_labels(sizes, rng)
    images = _pixels(rng, (len(labels), 28, 28))
    folder = raw / "MNIST" / "raw"
    folder.mkdir(parents=True)
    header = struct.pack(">IIII", 0x803, len(labels), 28, 28)  # idx3: magic, count, rows, columns
    (folder / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    header = struct.pack(">II", 0x801, len(labels))  # idx1: magic, count
    (folder / "t10k-labels-idx1-ubyte").write_bytes(header + labels.astype(np.uint8).tobytes())
    return raw, [f"class_{d}" for d in range(10)], _by_class(labels, list(images), 10)


# {CIFAR folder: {file name: MD5}} of the fake copy written last: `published_fakes` makes these the published MD5s.
FAKE_MD5S = {}
PUBLISHED_MD5S = convert_module._published_md5s  # the real lookup (torchvision's lists), before any test patches it


@pytest.fixture(autouse=True)
def published_fakes(monkeypatch):
    """The converter takes the fake CIFAR copy a test wrote last for the official one (its MD5s are "published")."""
    monkeypatch.setattr(convert_module, "_published_md5s", lambda cifar: FAKE_MD5S[cifar.base_folder])


def _write_cifar(raw, sizes, label_names, folder, batch, meta, names_key, labels_key):
    """A CIFAR python-version copy; ``label_names`` in torchvision label order."""
    rng = np.random.default_rng(1)
    labels = _shuffled_labels(sizes, rng)
    data = _pixels(rng, (len(labels), 3 * 32 * 32))
    (raw / folder).mkdir(parents=True)
    with open(raw / folder / batch, "wb") as f:
        pickle.dump({"data": data, labels_key: labels.tolist()}, f)
    with open(raw / folder / meta, "wb") as f:
        pickle.dump({names_key: list(label_names)}, f)
    FAKE_MD5S[folder] = {name: hashlib.md5((raw / folder / name).read_bytes()).hexdigest() for name in (batch, meta)}
    names = sorted(label_names)
    class_id = [names.index(n) for n in label_names]
    images = list(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return raw, names, _by_class([class_id[t] for t in labels], images, len(names))


def write_cifar10(raw, sizes, label_names=None):
    label_names = label_names or [f"label_{k}" for k in reversed(range(10))]  # not sorted: ids must sort them
    return _write_cifar(
        raw, sizes, label_names, "cifar-10-batches-py", "test_batch", "batches.meta", "label_names", "labels"
    )


def write_cifar100(raw, sizes, label_names=None):
    label_names = label_names or [f"label_{k:03d}" for k in reversed(range(100))]
    return _write_cifar(raw, sizes, label_names, "cifar-100-python", "test", "meta", "fine_label_names", "fine_labels")


def write_pet(raw, sizes):
    """Oxford-IIIT Pet; class 0's first image is a PNG and class 1's a GIF, both named .jpg."""
    rng = np.random.default_rng(2)
    base = raw / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    entries = [(f"breed_{c:02d}_{i + 1}", c) for c, n in enumerate(sizes) for i in range(n)]
    entries = [entries[k] for k in rng.permutation(len(entries))]
    originals = [[] for _ in sizes]
    for image_id, c in entries:
        fmt = "PNG" if (c, len(originals[c])) == (0, 0) else "GIF" if (c, len(originals[c])) == (1, 0) else "JPEG"
        path = base / "images" / f"{image_id}.jpg"
        path.write_bytes(_encoded(rng, fmt))
        originals[c].append(path)
    lines = "".join(f"{image_id} {c + 1} {1 + c % 2} {c + 1}\n" for image_id, c in entries)
    (base / "annotations" / "test.txt").write_text(lines)
    (base / "annotations" / "trainval.txt").write_text(lines.splitlines(keepends=True)[0])
    return raw, [f"Breed {c:02d}" for c in range(len(sizes))], originals


def write_food(raw, sizes):
    rng = np.random.default_rng(3)
    base = raw / "food-101"
    names = [f"food_{c:03d}" for c in range(len(sizes))]
    test = {}
    for c in reversed(range(len(sizes))):  # JSON order is not the id order: ids follow the sorted names
        (base / "images" / names[c]).mkdir(parents=True)
        test[names[c]] = [f"{names[c]}/{1000 + 7 * i}" for i in range(sizes[c])]
        for rel in test[names[c]]:
            (base / "images" / f"{rel}.jpg").write_bytes(_encoded(rng, "JPEG"))
    (base / "meta").mkdir()
    (base / "meta" / "test.json").write_text(json.dumps(test))
    (base / "meta" / "train.json").write_text(json.dumps({n: [] for n in names}))
    (base / "meta" / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    return raw, names, [[base / "images" / f"{rel}.jpg" for rel in test[n]] for n in names]


def write_cars(raw, sizes):
    rng = np.random.default_rng(4)
    base = raw / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    (base / "cars_test").mkdir()
    names = [f"Make{c:03d} Model {2000 + c % 13}" for c in range(len(sizes))]
    labels = _shuffled_labels(sizes, rng)
    annotations = np.zeros((1, len(labels)), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
    paths = []
    for k, label in enumerate(labels):
        fname = f"{k + 1:05d}.jpg"
        (base / "cars_test" / fname).write_bytes(_encoded(rng, "JPEG"))
        annotations[0, k] = (np.array([[1]]), np.array([[label + 1]]), fname)
        paths.append(base / "cars_test" / fname)
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object).reshape(1, -1)})
    return raw, names, _by_class(labels, paths, len(names))


def _write_domainnet(domain, raw, sizes):
    """``raw/<domain>/<class>/<image>`` for the 345 classes, files created out of name order."""
    rng = np.random.default_rng(5)
    splits = json.loads(DOMAINNET_SPLITS_FILE.read_text())
    names = splits["train"] + splits["valid"] + splits["test"]
    originals = []
    for name, size in zip(names, sizes):
        folder = raw / domain / name
        folder.mkdir(parents=True)
        paths = [folder / f"{name}_{i:06d}.jpg" for i in reversed(range(size))]
        for path in paths:
            path.write_bytes(_encoded(rng, "JPEG"))
        originals.append(sorted(paths))
    return raw, names, originals


WRITERS = {
    "mnist": write_mnist,
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "pet": write_pet,
    "food": write_food,
    "cars": write_cars,
    "sketch": lambda raw, sizes: _write_domainnet("sketch", raw, sizes),
    "clipart": lambda raw, sizes: _write_domainnet("clipart", raw, sizes),
}


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """``conversions(name)``: ``name`` fabricated and converted once per module, for tests that only read it."""
    done = {}

    def get(name):
        if name not in done:
            base = tmp_path_factory.mktemp(f"{name}-")
            raw, class_names, originals = WRITERS[name](base / "raw", _sizes(name))
            summary = convert(name, raw, base / "records")
            done[name] = SimpleNamespace(
                name=name, raw=raw, records=base / "records", class_names=class_names, originals=originals,
                summary=summary,
            )
        return done[name]

    return get


# --- the registry --------------------------------------------------------------------------------


def test_every_smat_bench_source_has_a_converter_and_a_raw_layout_test():
    declared = {n for n in list_sources() if get_source(n).converter == "smat-bench"}
    assert set(list_converters()) == declared == set(WRITERS)


def test_packaged_domainnet_splits_are_a_verbatim_copy_of_the_reference():
    reference = ROOT / "tests" / "data" / "shared" / "reference" / "domainnet_class_splits.json"
    assert DOMAINNET_SPLITS_FILE.read_bytes() == reference.read_bytes()


# --- a sound conversion --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_converters())
def test_converted_source_verifies_and_matches_its_declaration(name, conversions):
    converted = conversions(name)
    spec = get_source(converted.name).load_spec(converted.records)  # raises on other class counts
    assert verify_source(converted.records / converted.name).startswith(f"{converted.name}: {spec.num_classes} classes")
    assert [spec.class_names[c] for c in range(spec.num_classes)] == converted.class_names
    assert [spec.images_per_class[c] for c in range(spec.num_classes)] == list(map(len, converted.originals))
    assert sorted(p.name for p in converted.records.iterdir()) == [converted.name]  # no staging directory left
    assert converted.summary.startswith(f"{converted.name}: wrote {spec.num_classes} classes")
    assert "\n" not in converted.summary


@pytest.mark.parametrize("name", list_converters())
def test_sampled_episode_classes_index_real_records(name, conversions):
    converted = conversions(name)
    spec = get_source(converted.name).load_spec(converted.records)
    for split in get_source(converted.name).splits():
        sampler = EpisodeDescriptionSampler.from_seed(spec, split, EpisodeDescriptionConfig(), 0)
        for _ in range(3):
            for rel, num_support, num_query in sampler.sample_episode_description():
                class_id = spec.get_classes(split)[rel]
                records = RecordFile(spec.class_path(class_id))
                assert len(records) >= num_support + num_query
                assert records.example(len(records) - 1)[1] == class_id


@pytest.mark.parametrize("name", list_converters())
def test_records_hold_each_image_in_order_jpeg_bytes_kept_others_lossless_png(name, conversions):
    converted = conversions(name)
    spec = load_dataset_spec(converted.records / converted.name)
    for class_id, originals in enumerate(converted.originals):
        records = RecordFile(spec.class_path(class_id))
        assert len(records) == len(originals)
        for index, original in enumerate(originals):
            image, label = records.example(index)
            assert label == class_id
            if isinstance(original, np.ndarray):  # CIFAR, MNIST: exact pixels at native resolution
                assert image.startswith(PNG_MAGIC)
                pixels = original if original.ndim == 3 else np.repeat(original[..., None], 3, axis=2)
                assert np.array_equal(decode_image(image), pixels)
            elif original.read_bytes().startswith(b"\xff\xd8"):
                assert image == original.read_bytes()
            else:
                assert image.startswith(PNG_MAGIC)
                with Image.open(original) as expected:
                    assert np.array_equal(decode_image(image), np.asarray(expected.convert("RGB")))


def test_pet_png_and_gif_named_jpg_are_reencoded(conversions):
    converted = conversions("pet")
    spec = load_dataset_spec(converted.records / "pet")
    for class_id in (0, 1):
        assert RecordFile(spec.class_path(class_id)).example(0)[0].startswith(PNG_MAGIC)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_extended_sources_match_the_reference_spec_names_and_splits(name, tmp_path, specs_dir):
    reference = load_dataset_spec(specs_dir / name)
    names = [reference.class_names[c] for c in range(reference.num_classes)]
    extra = {} if name == "mnist" else {"label_names": names[::-1]}  # sorted by the converter, whatever the meta order
    raw, _, _ = WRITERS[name](tmp_path / "raw", _sizes(name), **extra)
    convert(name, raw, tmp_path / "records")
    spec = load_dataset_spec(tmp_path / "records" / name)
    assert spec.class_names == reference.class_names
    assert spec.classes_per_split == reference.classes_per_split


@pytest.mark.parametrize("name", ["sketch", "clipart"])
def test_domainnet_accepts_the_domain_folder_itself(name, conversions, tmp_path):
    converted = conversions(name)
    convert(converted.name, converted.raw / converted.name, tmp_path)
    assert _files(tmp_path / converted.name) == _files(converted.records / converted.name)


def test_domainnet_ids_enumerate_train_valid_test_names_in_json_order(conversions):
    converted = conversions("sketch")
    splits = json.loads(DOMAINNET_SPLITS_FILE.read_text())
    spec = load_dataset_spec(converted.records / "sketch")
    for split in Split:
        ids = spec.get_classes(split)
        assert [spec.class_names[c] for c in ids] == splits[split.value.lower()]
    assert [spec.classes_per_split[s] for s in Split] == [207, 51, 87]


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", "MNIST/raw/t10k-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/test_batch"),
        ("cifar100", "cifar-100-python/test"),
        ("pet", "oxford-iiit-pet/annotations/test.txt"),
        ("food", "food-101/meta/test.json"),
        ("cars", "stanford_cars/cars_test_annos_withlabels.mat"),
        ("sketch", "sketch/<class>/<image>"),
        ("clipart", "clipart/<class>/<image>"),
    ],
)
def test_wrong_layout_is_one_error_naming_the_expected_files(name, expected, tmp_path):
    (tmp_path / "raw" / "unrelated").mkdir(parents=True)
    with pytest.raises(DataError, match=f"RAW_DIR must hold .*{expected}"):
        convert(name, tmp_path / "raw", tmp_path / "records")
    assert not (tmp_path / "records" / name).exists()


def test_partly_present_layout_names_the_missing_file(tmp_path):
    raw, _, _ = write_cifar10(tmp_path / "raw", _sizes("cifar10"))
    (raw / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py/batches\.meta"):
        convert("cifar10", raw, tmp_path / "records")


def test_missing_raw_dir_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such directory"):
        convert("food", tmp_path / "nope", tmp_path / "records")


def test_class_with_one_image_is_an_error_naming_the_class(tmp_path):
    sizes = _sizes("cifar10")
    sizes[3] = 1
    raw, names, originals = write_cifar10(tmp_path / "raw", sizes)
    (small,) = [c for c, images in enumerate(originals) if len(images) == 1]
    with pytest.raises(DataError, match=rf"class {small} '{names[small]}' \(1 image\).*one support and one query"):
        convert("cifar10", raw, tmp_path / "records")
    assert not (tmp_path / "records" / "cifar10").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_is_an_error_naming_the_file(workers, tmp_path):
    raw, _, originals = write_pet(tmp_path / "raw", _sizes("pet"))
    originals[5][1].write_bytes(b"not an image")
    with pytest.raises(DataError, match=rf"{originals[5][1].name}: cannot read"):
        convert("pet", raw, tmp_path / "records", workers=workers)
    assert list((tmp_path / "records").iterdir()) == []


def test_cifar_md5s_are_the_published_ones_torchvision_lists():
    datasets = convert_module._torchvision_datasets()
    assert PUBLISHED_MD5S(datasets.CIFAR10) == {
        "test_batch": "40351d587109b95175f43aff81a1287e", "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
    assert PUBLISHED_MD5S(datasets.CIFAR100) == {
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc", "meta": "7973b15100ade9c7d40fb424638fde48"}


@pytest.mark.parametrize("name, folder, file", [
    ("cifar10", "cifar-10-batches-py", "test_batch"), ("cifar10", "cifar-10-batches-py", "batches.meta"),
    ("cifar100", "cifar-100-python", "test"), ("cifar100", "cifar-100-python", "meta"),
])
def test_a_cifar_file_that_is_not_the_published_one_is_refused_before_it_is_unpickled(name, folder, file, tmp_path,
                                                                                       monkeypatch):
    raw, _, _ = WRITERS[name](tmp_path / "raw", _sizes(name))
    (raw / folder / file).write_bytes(planted_pickle(tmp_path / "planted"))
    unpickled = []
    monkeypatch.setattr(pickle, "load", lambda *args, **kwargs: unpickled.append(args))
    with pytest.raises(DataError, match=rf"{folder}/{file}: MD5 \w+ is not the published {FAKE_MD5S[folder][file]}.*"
                                        r"re-download the official https://www\.cs\.toronto\.edu/~kriz/cifar-10"):
        convert(name, raw, tmp_path / "records")
    assert unpickled == [] and not (tmp_path / "planted").exists() and not (tmp_path / "records").exists()


# --- atomicity, re-runs, determinism -------------------------------------------------------------


def _interrupt_after(monkeypatch, calls):
    real, seen = convert_module._image_bytes, []

    def flaky(image):
        seen.append(image)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return real(image)

    monkeypatch.setattr(convert_module, "_image_bytes", flaky)


def test_interrupted_conversion_leaves_no_source_directory(tmp_path, monkeypatch):
    raw, _, _ = write_cifar10(tmp_path / "raw", _sizes("cifar10"))
    _interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        convert("cifar10", raw, tmp_path / "records")
    assert list((tmp_path / "records").iterdir()) == []


def test_interrupted_rerun_keeps_the_existing_copy(tmp_path, monkeypatch):
    raw, _, _ = write_cifar10(tmp_path / "raw", _sizes("cifar10"))
    convert("cifar10", raw, tmp_path / "records")
    before = _files(tmp_path / "records" / "cifar10")
    _interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        convert("cifar10", raw, tmp_path / "records")
    assert [p.name for p in (tmp_path / "records").iterdir()] == ["cifar10"]
    assert _files(tmp_path / "records" / "cifar10") == before


def _converted_twice_with_failing_moves(tmp_path, monkeypatch, failing):
    """(the first conversion's files, the exception of a second one whose moves out of its staging
    directory of the entries named ``failing`` fail)."""
    raw, _, _ = write_cifar10(tmp_path / "raw", _sizes("cifar10"))
    convert("cifar10", raw, tmp_path / "records")
    before = _files(tmp_path / "records" / "cifar10")
    rename = Path.rename

    def planted(self, target):
        if self.name in failing and self.parent.name.startswith(".cifar10.partial-"):
            raise OSError("planted failure")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", planted)
    with pytest.raises((OSError, DataError)) as err:
        convert("cifar10", raw, tmp_path / "records")
    return before, err.value


def test_a_failed_swap_puts_the_existing_copy_back(tmp_path, monkeypatch):
    before, err = _converted_twice_with_failing_moves(tmp_path, monkeypatch, failing=("cifar10",))  # the new copy in
    assert "planted failure" in str(err)
    assert [p.name for p in (tmp_path / "records").iterdir()] == ["cifar10"]
    assert _files(tmp_path / "records" / "cifar10") == before


def test_an_old_copy_that_cannot_go_back_is_kept_and_named(tmp_path, monkeypatch):
    before, err = _converted_twice_with_failing_moves(tmp_path, monkeypatch, failing=("cifar10", "replaced"))
    assert isinstance(err, DataError) and "both are kept" in str(err)
    kept = Path(str(err).split("the old copy at ")[1].split(", the verified")[0])
    new = Path(str(err).split("the verified new one at ")[1].split("; move")[0])
    assert kept.name == "replaced" and _files(kept) == before
    assert new.name == "cifar10" and _files(new) == before  # the same raw data: the same bytes


def test_rerun_replaces_the_existing_copy_as_a_whole(tmp_path):
    raw, _, _ = write_cifar10(tmp_path / "raw", _sizes("cifar10"))
    convert("cifar10", raw, tmp_path / "records")
    first = _files(tmp_path / "records" / "cifar10")
    (tmp_path / "records" / "cifar10" / "stale.tfrecords").write_bytes(b"left over")
    (tmp_path / "records" / "cifar10" / "0.tfrecords").write_bytes(b"damaged")
    convert("cifar10", raw, tmp_path / "records")
    assert _files(tmp_path / "records" / "cifar10") == first
    assert [p.name for p in (tmp_path / "records").iterdir()] == ["cifar10"]


@pytest.mark.parametrize("name", ["cifar100", "pet"])
def test_two_workers_write_byte_identical_output(name, tmp_path):
    raw, _, _ = WRITERS[name](tmp_path / "raw", _sizes(name))
    convert(name, raw, tmp_path / "one", workers=1)
    convert(name, raw, tmp_path / "two", workers=2)
    assert _files(tmp_path / "two" / name) == _files(tmp_path / "one" / name)


# --- command line --------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "registry.convert", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )


def test_cli_converts_and_prints_one_summary_line(tmp_path):
    raw, _, _ = write_mnist(tmp_path / "raw", _sizes("mnist"))
    result = _cli("mnist", "--raw", raw, "--out", tmp_path / "records", "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("mnist: wrote 10 classes (train/valid/test 0/0/10), 25 images to ")


def test_cli_refuses_a_cifar_copy_whose_md5s_are_not_the_published_ones(tmp_path):
    """In a fresh process (no test's MD5s): a fake copy is not the official one; one line, and nothing unpickled."""
    raw, _, _ = write_cifar10(tmp_path / "raw", _sizes("cifar10"))
    (raw / "cifar-10-batches-py" / "test_batch").write_bytes(planted_pickle(tmp_path / "planted"))
    result = _cli("cifar10", "--raw", raw, "--out", tmp_path / "records")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "test_batch: MD5" in result.stderr and "not the published 40351d587109b95175f43aff81a1287e" in result.stderr
    assert "re-download the official https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in result.stderr
    assert not (tmp_path / "planted").exists() and not (tmp_path / "records" / "cifar10").exists()


@pytest.mark.parametrize(
    "name, says", [("imagenet", "is unknown"), ("traffic_sign", "re-run the official Meta-Dataset conversion")]
)
def test_cli_unknown_name_exits_2_with_one_line_listing_the_converters(name, says, tmp_path):
    result = _cli(name, "--raw", tmp_path, "--out", tmp_path / "records")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert says in result.stderr and ", ".join(list_converters()) in result.stderr
    assert "traffic_sign, mscoco come from the official Meta-Dataset conversion" in result.stderr
    assert not (tmp_path / "records").exists()
