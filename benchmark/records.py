"""Meta-Dataset record files, read and written without TensorFlow and without index files.

A class file ``<records>/<source>/<class_id>.tfrecords`` is a sequence of TFRecord frames::

    u64 LE length L | u32 masked CRC-32C of the 8 length bytes | L payload bytes | u32 masked CRC-32C of payload

with mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2**32. Each payload is a serialized
``tf.train.Example`` holding ``image`` (BytesList, one JPEG) and ``label`` (Int64List, the class id).

Example:
    >>> rf = RecordFile("records/aircraft/0.tfrecords")
    >>> image, label = rf.example(3)
    >>> decode_image(image).shape
    (H, W, 3)

Command line::

    python -m benchmark.records verify SOURCE_DIR
    python -m benchmark.records export SOURCE_DIR --class C --index I --out FILE.npy
"""

import hashlib
import io
import os
import struct
import sys
import time
from functools import partial
from pathlib import Path

import google_crc32c
import numpy as np
import simplejpeg
from PIL import Image
from tqdm import tqdm

from registry.dataset_spec import load_dataset_spec
from registry.errors import CommandParser, DataError, exit_on_error

__all__ = [
    "RecordError",
    "encode_example",
    "decode_example",
    "write_records",
    "iter_records",
    "RecordFile",
    "decode_image",
    "verify_source",
    "check_label",
    "check_count",
]

_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_FOOTER = struct.Struct("<I")  # masked CRC of the payload
_FRAME = _HEADER.size + _FOOTER.size  # 16 bytes of framing per record
_U64 = 1 << 64
_LEN = 2  # protobuf wire type of length-delimited fields


class RecordError(DataError):
    """A record file is missing, corrupt, truncated or disagrees with its ``dataset_spec.json``."""


def _masked_crc(data):
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _fix(path):
    return f"re-run the Meta-Dataset conversion of {Path(path).parent.name or 'this source'}"


def _fault(path, index, what, fix=None):
    """A `RecordError` naming the file, the record and the fix (default `_fix`)."""
    return RecordError(f"{path}: record {index}: {what}; {fix or _fix(path)}")


def _check_header(path, index, header, pos, size, fix=None):
    """Payload length of the 12-byte ``header`` of record ``index``, at byte ``pos`` of a ``size``-byte file."""
    if len(header) < _HEADER.size:
        raise _fault(path, index, f"file truncated inside the record header at byte {pos} "
                                  f"({len(header)} of 12 bytes)", fix)
    length, crc = _HEADER.unpack(header)
    if crc != _masked_crc(header[:8]):
        raise _fault(path, index, f"length CRC mismatch in the record header at byte {pos} (corrupt framing)", fix)
    if length + _FRAME > size - pos:
        raise _fault(path, index, f"file truncated (the record at byte {pos} needs {length + _FRAME} bytes, "
                                  f"{size - pos} left)", fix)
    return length


def _check_payload(path, index, payload, footer, fix=None):
    if _FOOTER.unpack(footer)[0] != _masked_crc(payload):
        raise _fault(path, index, "payload CRC mismatch (corrupt record)", fix)


def _varint(buf, pos):
    """(value, next position) of the varint at ``buf[pos]``; at most 10 bytes."""
    result = shift = 0
    while shift < 70:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & (_U64 - 1), pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _parse(buf, span):
    """{(field number, wire type): [values]} of the message ``buf[span[0]:span[1]]``.

    A varint's value is an int, a length-delimited field's value is its (start, end) span in ``buf``.
    """
    fields = {}
    pos, end = span
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):  # fixed64, fixed32 (float lists written unpacked): skipped
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
        fields.setdefault((key >> 3, wire), []).append(value)
    return fields


def decode_example(payload, where="payload"):
    """(image bytes, label) of a serialized ``tf.train.Example``; other features are skipped.

    Raises:
        RecordError: not an Example, or ``image``/``label`` missing or not exactly one value. The
            message starts with ``where``.
    """
    try:
        features = {}
        for span in _parse(payload, (0, len(payload))).get((1, _LEN), []):  # Example.features
            for entry in _parse(payload, span).get((1, _LEN), []):  # Features.feature map entry
                entry = _parse(payload, entry)  # {1: key, 2: Feature}
                key = bytes(payload[slice(*entry[1, _LEN][-1])]) if (1, _LEN) in entry else b""
                features[key] = entry.get((2, _LEN), [(0, 0)])[-1]
        missing = [name for name in ("image", "label") if name.encode() not in features]
        if missing:
            raise ValueError(f"no {' or '.join(missing)} feature")
        images, labels = [], []
        for span in _parse(payload, features[b"image"]).get((1, _LEN), []):  # Feature.bytes_list
            images += _parse(payload, span).get((1, _LEN), [])
        for span in _parse(payload, features[b"label"]).get((3, _LEN), []):  # Feature.int64_list
            values = _parse(payload, span)
            labels += values.get((1, 0), [])  # unpacked
            for pos, end in values.get((1, _LEN), []):  # packed, as TF writes it
                while pos < end:
                    n, pos = _varint(payload, pos)
                    labels.append(n)
        if len(images) != 1 or len(labels) != 1:
            raise ValueError(f"expected 1 image and 1 int64 label, found {len(images)} and {len(labels)}")
    except (ValueError, IndexError) as err:
        reason = "truncated message" if isinstance(err, IndexError) else err
        raise RecordError(f"{where}: not a Meta-Dataset tf.train.Example ({reason}); re-run the conversion") from None
    label = labels[0]
    return bytes(payload[slice(*images[0])]), label - _U64 if label >= 1 << 63 else label


def _varint_bytes(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field_bytes(field, data):
    """A length-delimited field: key, length, data."""
    return _varint_bytes(field << 3 | 2) + _varint_bytes(len(data)) + data


def encode_example(image, label):
    """Serialize ``tf.train.Example`` {image: BytesList[image], label: Int64List[label]} (packed, as TF does).

    Raises:
        ValueError: ``label`` is outside the int64 range.
    """
    label = int(label)
    if not -(1 << 63) <= label < 1 << 63:
        raise ValueError(f"label {label} does not fit in int64")
    image_feature = _field_bytes(1, _field_bytes(1, bytes(image)))  # Feature.bytes_list.value
    label_feature = _field_bytes(3, _field_bytes(1, _varint_bytes(label % _U64)))  # Feature.int64_list.value
    entries = b"".join(
        _field_bytes(1, _field_bytes(1, key) + _field_bytes(2, feature))  # map entry {key, value}
        for key, feature in ((b"image", image_feature), (b"label", label_feature))
    )
    return _field_bytes(1, entries)  # Example.features.feature


def write_records(path, payloads):
    """Write ``payloads`` as TFRecord frames to ``path``, atomically (via ``path.tmp``); return the count."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for payload in payloads:
                length = struct.pack("<Q", len(payload))
                f.write(length + _FOOTER.pack(_masked_crc(length)))
                f.write(payload)
                f.write(_FOOTER.pack(_masked_crc(payload)))
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _open(path, fix=None):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise RecordError(f"{path}: no such record file; {fix or _fix(path)} or check the records root") from None


def iter_records(path, check_crc=True):
    """Yield the payloads of the record file ``path`` in order.

    The length CRC is always checked (it makes the framing trustworthy); ``check_crc`` also checks each
    payload's CRC.

    Raises:
        RecordError: missing file, bad CRC or truncation; names the record index.
    """
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        pos = index = 0
        while pos < size:
            length = _check_header(path, index, f.read(_HEADER.size), pos, size)
            payload, footer = f.read(length), f.read(_FOOTER.size)
            if check_crc:
                _check_payload(path, index, payload, footer)
            yield payload
            pos += length + _FRAME
            index += 1


class RecordFile:
    """Random access to the payloads of one record file.

    The framing is scanned once, on first use, by reading only the 12-byte headers. The file is opened
    lazily in each process (an instance pickles without a handle), so it is safe in DataLoader workers.

    Args:
        path: the ``.tfrecords`` file.
        check_crc: check each payload's CRC on `read` (the length CRCs are always checked by the scan).
        fix: what its errors tell to do (default: re-run the Meta-Dataset conversion of its directory).
    """

    def __init__(self, path, check_crc=True, fix=None):
        self.path = Path(path)
        self.check_crc = check_crc
        self.fix = fix
        self._starts = None  # start of each record, then the file size: record i is starts[i]:starts[i+1]
        self._file = self._pid = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def _handle(self):
        if self._pid != os.getpid():  # never share a file offset with a forked parent
            self._file, self._pid = _open(self.path, self.fix), os.getpid()
        return self._file

    def _scan(self):
        if self._starts is None:
            f = self._handle()
            size = os.fstat(f.fileno()).st_size
            starts, pos = [], 0
            while pos < size:
                f.seek(pos)
                starts.append(pos)
                pos += _check_header(self.path, len(starts) - 1, f.read(_HEADER.size), pos, size, self.fix) + _FRAME
            self._starts = np.array(starts + [size], dtype=np.int64)
        return self._starts

    def __len__(self):
        return len(self._scan()) - 1

    def read(self, i):
        """Payload of record ``i`` (0-based).

        Raises:
            IndexError: ``i`` is outside 0..len-1.
            RecordError: the payload CRC does not match, or the file shrank since the scan.
        """
        starts = self._scan()
        if not 0 <= i < len(starts) - 1:
            raise IndexError(f"{self.path}: record {i} is outside 0..{len(starts) - 2}")
        start, end = int(starts[i]), int(starts[i + 1])
        f = self._handle()
        f.seek(start + _HEADER.size)
        data = f.read(end - start - _HEADER.size)
        if len(data) != end - start - _HEADER.size:
            raise _fault(self.path, i, "file truncated since it was opened", self.fix)
        payload = data[: -_FOOTER.size]
        if self.check_crc:
            _check_payload(self.path, i, payload, data[-_FOOTER.size :], self.fix)
        return payload

    def fingerprint(self):
        """SHA-256 of every record's length and payload CRC, in order: the file's content identified by
        reading its 16 bytes of framing per record, not its payloads."""
        starts = self._scan()
        fd = self._handle().fileno()
        digest = hashlib.sha256(np.diff(starts).tobytes())
        for end in starts[1:]:
            digest.update(os.pread(fd, _FOOTER.size, int(end) - _FOOTER.size))
        return digest.hexdigest()

    def example(self, i):
        """(image bytes, label) of record ``i``."""
        return decode_example(self.read(i), where=f"{self.path}: record {i}")

    def close(self):
        if self._file is not None:
            self._file.close()
        self._file = self._pid = None


JPEG_TRUNCATED = "Premature end of JPEG file"  # libjpeg's JWRN_JPEG_EOF, the one warning TF's decoder refuses
SOS, EOI = b"\xff\xda", b"\xff\xd9"  # JPEG markers: start of scan, end of image (a scan's data never holds them)


def decode_image(image_bytes, where="image"):
    """Decode a record's image to a new uint8 H×W×3 RGB array, as the official reader does.

    JPEGs (every official record) decode with libjpeg-turbo's fast integer DCT and fancy upsampling,
    the defaults of ``tf.io.decode_image(channels=3)`` in the official ``ImageDecoder``, so pixels
    are TensorFlow's. Like TF, the decoder reads through libjpeg's warnings about corrupt scan data
    and refuses a truncated JPEG. Anything else (PNG, a JPEG libjpeg-turbo cannot read, ...) goes
    through PIL; alpha is dropped and 16-bit greyscale keeps the high byte, as TF does (PIL's own
    conversion would clip it to 255).

    Raises:
        RecordError: the bytes are not a decodable image; the message starts with ``where``.
    """
    if image_bytes[:2] == b"\xff\xd8":
        decode = partial(simplejpeg.decode_jpeg, image_bytes, colorspace="RGB", fastdct=True, fastupsample=False)
        try:
            return decode(strict=True)
        except ValueError as err:  # a libjpeg warning, or a JPEG libjpeg-turbo cannot read
            # libjpeg-turbo names only the first warning; the scan's end-of-image marker tells truncation
            if str(err).startswith(JPEG_TRUNCATED) or image_bytes.rfind(EOI) < image_bytes.rfind(SOS):
                raise RecordError(f"{where}: not a decodable image (truncated JPEG: {err}); re-run the "
                                  "conversion of this source") from None
        try:
            return decode(strict=False)  # corrupt scan data, which TF decodes through
        except ValueError:
            pass  # PIL may read it
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            if im.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" in older Pillow)
                grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))  # writable, unlike np.asarray
    except (OSError, SyntaxError, ValueError) as err:
        raise RecordError(f"{where}: not a decodable image ({err}); re-run the conversion of this source") from None


def check_label(path, index, label, class_id, fix):
    """Raise a `RecordError` unless record ``index`` of the class file ``path`` is labelled ``class_id``."""
    if label != class_id:
        raise RecordError(f"{path}: record {index}: label {label}, expected the class id {class_id}; {fix}")


def check_count(path, count, expected, fix):
    """Raise a `RecordError` unless the class file ``path`` holds the ``expected`` records of its spec."""
    if count != expected:
        raise RecordError(f"{path}: {count} records, dataset_spec.json says {expected}; {fix}")


def verify_source(source_dir):
    """Check every class file of a converted source against its ``dataset_spec.json``.

    Checks framing and CRCs, that every label is the file's class id, and that each file holds
    ``images_per_class`` records. A progress bar goes to stderr when it is a terminal.

    Returns:
        The one-line summary, e.g. ``"cifar10: 10 classes, 10000 records verified (CRC, labels, counts) in 1.2 s"``.

    Raises:
        DataError: the spec is missing or malformed.
        RecordError: the first fault found; names the file and the record.
    """
    began = time.perf_counter()
    spec = load_dataset_spec(source_dir)
    total = 0
    show = sys.stderr.isatty()
    for class_id in tqdm(range(spec.num_classes), desc=spec.name, unit="class", disable=not show):
        path, fix = spec.class_path(class_id), f"re-run the Meta-Dataset conversion of {spec.name}"
        count = 0
        for count, payload in enumerate(iter_records(path), 1):
            _, label = decode_example(payload, where=f"{path}: record {count - 1}")
            check_label(path, count - 1, label, class_id, fix)
        check_count(path, count, spec.get_total_images_per_class(class_id), fix)
        total += count
    elapsed = time.perf_counter() - began
    return f"{spec.name}: {spec.num_classes} classes, {total} records verified (CRC, labels, counts) in {elapsed:.1f} s"


def _export(source_dir, class_id, index, out):
    """Save record ``index`` of class ``class_id``, decoded and not resized, as a .npy file."""
    spec = load_dataset_spec(source_dir)
    if not 0 <= class_id < spec.num_classes:
        raise DataError(f"{spec.name}: class {class_id} is outside 0..{spec.num_classes - 1}")
    records = RecordFile(spec.class_path(class_id))
    if not 0 <= index < len(records):
        raise DataError(f"{records.path}: record index {index} is outside 0..{len(records) - 1}")
    image, _ = records.example(index)
    array = decode_image(image, where=f"{records.path}: record {index}")
    np.save(out, array)
    print(f"{out}: {array.shape[0]}x{array.shape[1]}x{array.shape[2]} {array.dtype}")


def main(argv=None):
    parser = CommandParser(prog="python -m benchmark.records", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check framing, CRCs, labels and counts of every class file")
    verify.add_argument("source_dir", type=Path)
    export = commands.add_parser("export", help="save one decoded image (H×W×3 uint8, not resized) as .npy")
    export.add_argument("source_dir", type=Path)
    export.add_argument("--class", dest="class_id", type=int, required=True, help="absolute class id")
    export.add_argument("--index", type=int, required=True, help="0-based record index in file order")
    export.add_argument("--out", type=Path, required=True, help="output .npy file")
    args = parser.parse_args(argv)
    with exit_on_error(parser.prog):
        if args.command == "verify":
            print(verify_source(args.source_dir))
        else:
            _export(args.source_dir, args.class_id, args.index, args.out)


if __name__ == "__main__":
    main()
