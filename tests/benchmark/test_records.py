"""benchmark.records: TFRecord framing, the Example codec, image decoding and the CLI (reference §1.2, §10.6-10.7)."""

import io
import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.records import (
    RecordError,
    RecordFile,
    decode_example,
    decode_image,
    encode_example,
    iter_records,
    write_records,
)
from registry.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
LABELS = [0, 1, 711, 2**31, 2**63 - 1, -1, -(2**63)]
PNG_MODES = ["rgb", "rgba", "palette", "la", "grey", "grey16"]


def _image_bytes(kind, size=(37, 23), seed=0):
    """Encoded test image of ``kind`` (``'rgb_jpeg'``, ``'grey_png'``, ...): a smooth pattern plus noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
    rgb = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    name, fmt = kind.rsplit("_", 1)
    image = {
        "rgb": lambda: Image.fromarray(rgb),
        "grey": lambda: Image.fromarray(rgb[..., 0]),
        "rgba": lambda: Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])),
        "la": lambda: Image.fromarray(np.dstack([rgb[..., 1], rgb[..., 2]]), mode="LA"),
        "palette": lambda: Image.fromarray(rgb).quantize(16),
        "grey16": lambda: Image.fromarray((rgb[..., 0].astype(np.uint16) * 257 + rgb[..., 1]).astype(np.uint16)),
        "cmyk": lambda: Image.fromarray(rgb).convert("CMYK"),
    }[name]()
    buf = io.BytesIO()
    image.save(buf, fmt.upper())
    return buf.getvalue()


def _payloads(n=5):
    return [encode_example(_image_bytes("rgb_jpeg", seed=i), label=7) for i in range(n)]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _record_start(payloads, i):
    """Byte offset of record ``i`` in a file of ``payloads`` (16 framing bytes per record)."""
    return sum(len(p) + 16 for p in payloads[:i])


# --- round trips -------------------------------------------------------------------------------


def test_written_records_read_back_identically(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [b"", b"x"] + [rng.bytes(n) for n in (3000, 200_000, 17)]
    path = tmp_path / "0.tfrecords"
    assert write_records(path, iter(payloads)) == len(payloads)
    assert list(iter_records(path)) == payloads
    records = RecordFile(path)
    assert len(records) == len(payloads)
    for i in rng.permutation(len(payloads)):
        assert records.read(int(i)) == payloads[i]
    assert not (tmp_path / "0.tfrecords.tmp").exists()


def test_failed_write_leaves_no_file(tmp_path):
    def payloads():
        yield b"ok"
        raise RuntimeError("conversion crashed")

    path = tmp_path / "0.tfrecords"
    with pytest.raises(RuntimeError):
        write_records(path, payloads())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label", LABELS)
def test_example_round_trip_keeps_image_and_label(label):
    image = _image_bytes("rgb_jpeg")
    assert decode_example(encode_example(image, label)) == (image, label)


def test_encode_example_rejects_label_outside_int64():
    with pytest.raises(ValueError, match="int64"):
        encode_example(b"x", 2**63)


def _len_field(field, data):
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


def _entry(key, feature):
    """A Features.feature map entry."""
    return _len_field(1, _len_field(1, key) + _len_field(2, feature))


def test_decode_example_accepts_unpacked_int64_and_skips_unknown_features():
    unpacked_label = _len_field(3, b"\x08\x05")  # Int64List.value = 5, wire type 0
    floats = _len_field(2, b"\x0d" + bytes(4))  # FloatList.value = 0.0, unpacked fixed32
    image = _len_field(1, _len_field(1, b"img"))  # BytesList.value = b"img"
    payload = _len_field(1, _entry(b"extra", floats) + _entry(b"label", unpacked_label) + _entry(b"image", image))
    assert decode_example(payload) == (b"img", 5)


@pytest.mark.parametrize(
    "payload, message",
    [
        (_len_field(1, _entry(b"image", _len_field(1, _len_field(1, b"i")))), "no label feature"),
        (b"\x0a\x01\x0a", "truncated"),
        (b"\x0b", "wire type"),
    ],
)
def test_decode_example_rejects_malformed_payload(payload, message):
    with pytest.raises(RecordError, match=f"record 4: .*{message}"):
        decode_example(payload, where="f.tfrecords: record 4")


_INHERITED = {}


def _read_inherited(i):
    return _INHERITED["records"].read(i)


def test_record_file_pickles_and_reads_in_forked_workers(tmp_path):
    payloads = _payloads(8)
    path = tmp_path / "0.tfrecords"
    write_records(path, payloads)
    records = RecordFile(path)
    assert records.read(3) == payloads[3]  # opens the file and scans it in the parent
    assert pickle.loads(pickle.dumps(records)).read(5) == payloads[5]
    _INHERITED["records"] = records  # forked workers inherit the parent's open handle
    with multiprocessing.get_context("fork").Pool(4) as pool:
        got = pool.map(_read_inherited, list(range(8)) * 100, chunksize=1)
    assert got == payloads * 100


# --- corruption --------------------------------------------------------------------------------


@pytest.fixture
def five_records(tmp_path):
    payloads = _payloads(5)
    path = tmp_path / "3.tfrecords"
    write_records(path, payloads)
    return path, payloads


def test_flipped_payload_byte_names_the_record(five_records):
    path, payloads = five_records
    _flip(path, _record_start(payloads, 3) + 12 + 40)
    with pytest.raises(RecordError, match=r"3\.tfrecords: record 3: payload CRC"):
        list(iter_records(path))
    records = RecordFile(path)
    assert records.read(2) == payloads[2]
    with pytest.raises(RecordError, match="record 3: payload CRC"):
        records.read(3)


def test_flipped_length_byte_names_the_record_and_its_byte(five_records):
    path, payloads = five_records
    _flip(path, _record_start(payloads, 2) + 1)
    message = f"record 2: length CRC mismatch in the record header at byte {_record_start(payloads, 2)} "
    with pytest.raises(RecordError, match=message):
        list(iter_records(path, check_crc=False))
    with pytest.raises(RecordError, match=message):
        len(RecordFile(path, check_crc=False))


@pytest.mark.parametrize("cut", [10, -5], ids=["inside_last_record", "partial_header_after_last"])
def test_truncated_file_names_the_last_record_and_its_byte(five_records, cut):
    path, payloads = five_records
    data = path.read_bytes()
    path.write_bytes(data[:-cut] if cut > 0 else data + data[:-cut])
    last = 4 if cut > 0 else 5
    message = f"record {last}: file truncated .*at byte {_record_start(payloads, last)} "
    with pytest.raises(RecordError, match=message):
        list(iter_records(path))
    with pytest.raises(RecordError, match=message):
        len(RecordFile(path))


def test_a_given_fix_replaces_the_default_one(five_records):
    path, payloads = five_records
    _flip(path, _record_start(payloads, 2) + 1)
    with pytest.raises(RecordError, match="record 2: .*; regenerate it$"):
        len(RecordFile(path, fix="regenerate it"))


def test_check_crc_false_skips_the_payload_crc(five_records):
    path, payloads = five_records
    offset = _record_start(payloads, 1) + 12 + len(payloads[1]) - 10
    _flip(path, offset)
    assert RecordFile(path, check_crc=False).read(1) != payloads[1]
    assert len(list(iter_records(path, check_crc=False))) == 5


def test_missing_file_is_a_record_error_naming_it(tmp_path):
    with pytest.raises(RecordError, match=r"9\.tfrecords: no such record file"):
        len(RecordFile(tmp_path / "9.tfrecords"))


# --- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [f"{m}_jpeg" for m in ("rgb", "grey", "cmyk")] + [f"{m}_png" for m in PNG_MODES])
def test_decode_image_is_uint8_hw3(kind):
    array = decode_image(_image_bytes(kind))
    assert array.shape == (23, 37, 3) and array.dtype == np.uint8 and array.flags.writeable


def test_decode_image_of_grey_repeats_the_channel():
    grey = np.asarray(Image.open(io.BytesIO(_image_bytes("grey_png"))))
    assert np.array_equal(decode_image(_image_bytes("grey_png")), np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("data", [b"not an image", _image_bytes("rgb_jpeg")[:200]], ids=["garbage", "truncated_jpeg"])
def test_undecodable_image_is_a_data_error_naming_where(data):
    with pytest.raises(DataError, match="0.tfrecords: record 2: not a decodable image"):
        decode_image(data, where="0.tfrecords: record 2")


# --- TensorFlow compatibility ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return pytest.importorskip("tensorflow")


def _tf_example(tf, image, label, extra=False):
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    if extra:
        feature["embedding"] = tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -1.0]))
        feature["names"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a", b"b"]))
        feature["ids"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[3, -4, 5]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


@pytest.mark.parametrize("extra", [False, True], ids=["two_features", "extra_features"])
def test_records_written_by_tensorflow_read_identically(tf, tmp_path, extra):
    path = str(tmp_path / "0.tfrecords")
    expected = [(_image_bytes("rgb_jpeg", seed=i), label) for i, label in enumerate(LABELS)]
    with tf.io.TFRecordWriter(path) as writer:
        for image, label in expected:
            writer.write(_tf_example(tf, image, label, extra).SerializeToString())
    assert [decode_example(p) for p in iter_records(path)] == expected
    records = RecordFile(path)
    assert [records.example(i) for i in range(len(records))] == expected


def test_our_records_read_by_tensorflow_identically(tf, tmp_path):
    path = tmp_path / "0.tfrecords"
    expected = [(_image_bytes("rgb_jpeg", seed=i), label) for i, label in enumerate(LABELS)]
    write_records(path, (encode_example(image, label) for image, label in expected))
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    got = []
    for serialized in tf.data.TFRecordDataset(str(path)):  # checks both CRCs
        parsed = tf.io.parse_single_example(serialized, spec)
        got.append((parsed["image"].numpy(), int(parsed["label"].numpy())))
        assert tf.train.Example.FromString(serialized.numpy()) == _tf_example(tf, *got[-1])
    assert got == expected


@pytest.mark.parametrize("kind", ["rgb_jpeg", "grey_jpeg"] + [f"{m}_png" for m in PNG_MODES])
def test_decode_image_agrees_with_tensorflow_within_one_level(tf, kind):
    """Against the call the official ``ImageDecoder`` makes: ``tf.io.decode_image(channels=3)``."""
    data = _image_bytes(kind)
    theirs = tf.io.decode_image(data, channels=3).numpy().astype(int)
    ours = decode_image(data).astype(int)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("quality", [75, 95, 100])
def test_jpeg_pixels_equal_the_official_fast_dct_decoding(tf, quality):
    """TF's default DCT is libjpeg's fast one; an accurate-DCT decoder differs by up to 8 levels at q95."""
    rng = np.random.default_rng(quality)
    image = Image.fromarray(rng.integers(0, 256, size=(84, 84, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    assert np.array_equal(decode_image(data), tf.io.decode_image(data, channels=3).numpy())


# --- command line ------------------------------------------------------------------------------

SPEC = {
    "name": "toy",
    "classes_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
    "images_per_class": {"0": 3, "1": 2, "2": 3, "3": 2},
    "class_names": {"0": "a", "1": "b", "2": "c", "3": "d"},
    "path": "x",
    "file_pattern": "{}.tfrecords",
    "__class__": "DatasetSpecification",
}


def _write_class(source, class_id, labels, kind="rgb_jpeg"):
    images = (_image_bytes(kind, size=(30 + class_id, 20 + i), seed=i) for i in range(len(labels)))
    write_records(source / f"{class_id}.tfrecords", (encode_example(im, lab) for im, lab in zip(images, labels)))


@pytest.fixture
def source(tmp_path):
    """A sound flat source "toy": 4 classes of 3, 2, 3, 2 records; class 3 holds greyscale PNGs."""
    source = tmp_path / "toy"
    source.mkdir()
    (source / "dataset_spec.json").write_text(json.dumps(SPEC))
    for class_id, count in SPEC["images_per_class"].items():
        _write_class(source, int(class_id), [int(class_id)] * count, "grey_png" if class_id == "3" else "rgb_jpeg")
    return source


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "benchmark.records", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )


def test_verify_sound_source_exits_0_with_one_summary_line(source):
    result = _cli("verify", source)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"toy: 4 classes, 10 records verified \(CRC, labels, counts\) in \d+\.\d s\n", result.stdout)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("missing", r"2\.tfrecords: no such record file; .*check the records root"),
        ("label", r"1\.tfrecords: record 1: label 3, expected the class id 1"),
        ("count", r"3\.tfrecords: 3 records, dataset_spec\.json says 2"),
        ("corrupt", r"2\.tfrecords: record 2: payload CRC mismatch"),
    ],
)
def test_verify_reports_the_first_fault_and_exits_2(source, fault, message):
    if fault == "missing":
        (source / "2.tfrecords").unlink()
    elif fault == "label":
        _write_class(source, 1, [1, 3])
    elif fault == "count":
        _write_class(source, 3, [3, 3, 3])
    else:
        _flip(source / "2.tfrecords", (source / "2.tfrecords").stat().st_size - 30)
    result = _cli("verify", source)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize("class_id, index, shape", [(2, 1, (21, 32, 3)), (3, 0, (20, 33, 3))], ids=["jpeg", "grey_png"])
def test_export_saves_the_decoded_record_unresized(source, tmp_path, class_id, index, shape):
    out = tmp_path / "image.npy"
    result = _cli("export", source, "--class", class_id, "--index", index, "--out", out)
    assert result.returncode == 0, result.stderr
    array = np.load(out)
    image, _ = RecordFile(source / f"{class_id}.tfrecords").example(index)
    assert array.shape == shape and array.dtype == np.uint8
    assert np.array_equal(array, decode_image(image))
    assert f"{shape[0]}x{shape[1]}x3" in result.stdout


@pytest.mark.parametrize(
    "args, message", [(["--class", 4, "--index", 0], "class 4 is outside 0..3"), (["--class", 1, "--index", 2], "0..1")]
)
def test_export_out_of_range_names_the_valid_range(source, tmp_path, args, message):
    result = _cli("export", source, *args, "--out", tmp_path / "x.npy")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def _jpeg_with_corrupt_scan_data():
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    stray = data.index(b"\xff\xda") + 200
    data[stray:stray + 2] = b"\xff\xd3"  # a restart marker in the middle of the scan
    return bytes(data)


def test_a_jpeg_with_corrupt_scan_data_decodes_as_tensorflow_decodes_it(tf):
    """libjpeg warns ("Corrupt JPEG data: premature end of data segment") and TF decodes through it with the
    fast DCT; an accurate-DCT fallback differs by several levels."""
    data = _jpeg_with_corrupt_scan_data()
    assert np.array_equal(decode_image(data), tf.io.decode_image(data, channels=3).numpy())


def test_a_truncated_jpeg_is_refused_even_after_a_corrupt_data_warning():
    """(libjpeg-turbo reports only the first warning; TF refuses a truncated JPEG.)"""
    data = _jpeg_with_corrupt_scan_data()
    with pytest.raises(DataError, match="not a decodable image"):
        decode_image(data[: len(data) * 2 // 3])
