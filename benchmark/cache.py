"""Decoded images, resized once per source and read by position: an optional fast path for episodes.

Decoding and resizing JPEGs is what episode assembly spends its time on. A decoded cache holds every
record of a source already decoded and resized for one preprocessing (`SourceRecords.pixels`), as
uint8::

    CACHE_ROOT/<source>/<resize>-<s>/
        <class_id>.npy   uint8 N×3×s×s in C order; row i is record i of <class_id>.tfrecords
        cache.json       format, source, image_size, resize, the SHA-256 of the source's dataset_spec.json,
                         and per class its record count and the record file's size, modification time
                         and content fingerprint (`RecordFile.fingerprint`)

Under ``center_crop`` (PIL output: integer grey levels) the cache is exact, so episodes read from it
are bitwise those decoded from the records. Under ``squash`` (bilinear, ``align_corners``) grey levels
are fractional and are stored rounded to the nearest integer: |Δ| ≤ 0.5 grey level, i.e. ≤ 0.5 / 127.5
after ``unit_range`` and ≤ 0.5 / (255 · std_c) after ``imagenet`` normalisation, which is applied when
images are read and is not part of the cache.

A build writes each class file atomically (``<class_id>.npy.tmp``, then a rename) and lists the classes
done so far in ``cache.partial.json``, so an interrupted build resumes: a class is rebuilt unless its
file has the right shape and its record file the content it had when the class was built (the
fingerprint is recomputed only for a record file whose size or modification time changed).
``cache.json`` is written last; a cache without it is not read. A cache is read only while every record
file has the size and modification time it had when the cache was built, so a re-converted source is
never served old pixels; copy records with their times (``rsync -a``, ``cp -p``) to keep a cache valid,
or run the build again, which then decodes only the classes whose records changed in content.

Reading needs no decoding and no mapping: image i of a class is ``s·s·3`` bytes at a fixed offset
after the ``.npy`` header, so an episode reads each of its images with one positioned read straight
into its batch (`DecodedSource.read`).

Example:
    >>> data = BenchmarkData("md_mini", decoded_cache="/data/decoded")  # after `build md_mini --cache /data/decoded`

Command line::

    python -m benchmark.cache build BENCHMARK [--sources NAME ...] [--records ROOT] [--cache DIR] [--workers N]
    python -m benchmark.cache verify BENCHMARK [--sources NAME ...] [--records ROOT] [--cache DIR] [--per-class K]

``--cache`` defaults to ``$SMAT_BENCH_DECODED``, else ``<records root>/decoded``.
"""

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmark.episodes import BenchmarkData
from benchmark.files import write_json
from registry.dataset_spec import SPEC_FILENAME
from registry.errors import CommandParser, DataError, exit_on_error

__all__ = ["DECODED_ENV", "TOLERANCE", "DecodedCache", "DecodedSource", "build_source", "verify_source"]

FORMAT = 2  # 2: per class, the record file's modification time and content fingerprint
DECODED_ENV = "SMAT_BENCH_DECODED"
META = "cache.json"
PARTIAL = "cache.partial.json"  # the classes of an unfinished build; replaced by cache.json at its end
TOLERANCE = {"center_crop": 0.0, "squash": 0.5}  # largest |cached − decoded| grey level, per resize
CHUNK = 64  # records decoded at a time: bounds the float32 pixels held while a class is built or verified


def _shape(count, preprocess):
    return (count, 3, preprocess.image_size, preprocess.image_size)


def _header(source, spec, preprocess):
    """The fields of ``cache.json`` other than ``classes``: what the cache was built from."""
    digest = hashlib.sha256(Path(spec.path, SPEC_FILENAME).read_bytes()).hexdigest()
    return dict(format=FORMAT, source=source, image_size=preprocess.image_size, resize=preprocess.resize,
                spec_sha256=digest)


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _pixel_offset(path, shape):
    """The byte offset of the pixels in the class file ``path`` if it is a complete ``.npy`` of a uint8
    C-order array of ``shape``, else None."""
    try:
        with open(path, "rb") as f:
            read_header = _HEADER_READERS.get(np.lib.format.read_magic(f))
            if read_header is None:
                return None
            stored_shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
            complete = os.fstat(f.fileno()).st_size == offset + math.prod(shape)
    except (OSError, ValueError, EOFError):
        return None
    ok = tuple(stored_shape) == shape and not fortran_order and dtype == np.uint8 and complete
    return offset if ok else None


def _file_state(path):
    """{"bytes", "mtime_ns"} of the record file ``path``."""
    try:
        state = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such record file; the decoded cache is checked against its records") from None
    return {"bytes": state.st_size, "mtime_ns": state.st_mtime_ns}


class DecodedCache:
    """A cache root: the decoded caches of a benchmark's sources, and the command that builds each.

    Args:
        root: the cache directory (``--cache``).
        benchmark: the benchmark named in build commands (its ``preprocessing`` decides the resize).
        records_root: the records the caches are built from.
    """

    def __init__(self, root, benchmark, records_root):
        self.root, self.benchmark, self.records_root = Path(root), benchmark, Path(records_root)

    def directory(self, source, preprocess):
        """``root/<source>/<resize>-<s>``: the cache of ``source`` under ``preprocess``."""
        return self.root / source / f"{preprocess.resize}-{preprocess.image_size}"

    def build_command(self, source):
        """The command that builds, resumes or refreshes the cache of ``source``."""
        return shlex.join(["python", "-m", "benchmark.cache", "build", self.benchmark, "--sources", source,
                           "--records", str(self.records_root), "--cache", str(self.root)])

    def open(self, source, spec, preprocess):
        """The checked `DecodedSource` of ``source`` (whose spec is ``spec``) under ``preprocess``."""
        return DecodedSource(self, source, spec, preprocess)


class DecodedSource:
    """The decoded cache of one source for one preprocessing, checked against the source's spec when opened.

    Opening checks that ``cache.json`` exists and was built from this ``dataset_spec.json`` (SHA-256),
    for this image size and resize, with the spec's record count for every class. A class file is checked
    when first read (its header parsed once); the object holds no open file (each read opens the class
    file), so it pickles into DataLoader workers.

    Raises:
        DataError: the cache is missing, unfinished or stale; names ``cache.json`` and the build command.
    """

    def __init__(self, cache, source, spec, preprocess):
        self.source, self.spec, self.preprocess = source, spec, preprocess
        self.directory = cache.directory(source, preprocess)
        self.fix = f"rebuild with: {cache.build_command(source)}"
        meta_file, spec_file = self.directory / META, Path(spec.path, SPEC_FILENAME)
        try:
            meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise DataError(
                f"{meta_file}: no decoded cache of source '{source}' (never built, or its build did not finish); "
                f"build it with: {cache.build_command(source)}"
            ) from None
        except ValueError:
            raise DataError(f"{meta_file}: not valid JSON; {self.fix}") from None
        meta = meta if isinstance(meta, dict) else {}
        for key, want in _header(source, spec, preprocess).items():
            if meta.get(key) != want:
                what = (f"built from another {spec_file} (its SHA-256 changed)" if key == "spec_sha256"
                        else f"{key} is {meta.get(key)!r}, expected {want!r}")
                raise DataError(f"{meta_file}: {what}; {self.fix}")
        classes = meta.get("classes") if isinstance(meta.get("classes"), dict) else {}
        if set(classes) != {str(c) for c in range(spec.num_classes)}:
            raise DataError(
                f"{meta_file}: caches {len(classes)} classes, {spec_file} has {spec.num_classes}; {self.fix}"
            )
        for c in range(spec.num_classes):
            entry, want = classes[str(c)], spec.get_total_images_per_class(c)
            have = entry.get("records") if isinstance(entry, dict) else None
            if have != want:
                raise DataError(
                    f"{meta_file}: class {c} has {have} cached records, {spec_file} says {want}; {self.fix}"
                )
            path = spec.class_path(c)
            if _file_state(path) != {key: entry.get(key) for key in ("bytes", "mtime_ns")}:
                raise DataError(
                    f"{path} changed since {meta_file} was built (its size or modification time differs: "
                    "re-converted, or copied without its times), so the cached pixels may not be its images; "
                    f"{self.fix} (it decodes again only the classes whose records changed)"
                )
        self.classes = classes  # per class: record count, and the record file's size, mtime and fingerprint
        self._offsets = {}  # class id -> where its pixels start in its file, once the file is checked

    def class_path(self, class_id):
        return self.directory / f"{class_id}.npy"

    def records_in(self, class_id):
        """The record count of class ``class_id``, once its class file is checked (the spec's count).

        Raises:
            DataError: the class file is missing, incomplete, or not a uint8 C-order array of the spec's shape.
        """
        self._checked_offset(class_id)
        return self.spec.get_total_images_per_class(class_id)

    def _checked_offset(self, class_id):
        """Where the pixels of class ``class_id`` start in its file; the file is checked on first use."""
        if class_id not in self._offsets:
            path, shape = self.class_path(class_id), _shape(self.spec.get_total_images_per_class(class_id),
                                                            self.preprocess)
            offset = _pixel_offset(path, shape)
            if offset is None:
                what = f"not a complete uint8 C-order array of shape {shape}" if path.exists() else "missing class file"
                raise DataError(f"{path}: {what} of the decoded cache of '{self.source}'; {self.fix}")
            self._offsets[class_id] = offset
        return self._offsets[class_id]

    def read(self, class_id, indices, out):
        """Read the cached pixels of records ``indices`` of class ``class_id`` into ``out`` (a contiguous
        uint8 ``N×3×s×s`` CPU tensor, e.g. a slice of an episode's batch): one positioned read per image,
        so an episode is assembled without an intermediate copy. Returns ``out``."""
        start, size = self._checked_offset(class_id), math.prod(out.shape[1:])
        path = self.class_path(class_id)
        rows = out.numpy().reshape(len(out), size)
        fd = os.open(path, os.O_RDONLY)
        try:
            for row, index in zip(rows, indices, strict=True):
                if os.preadv(fd, [row], start + int(index) * size) != size:
                    raise DataError(f"{path}: record {int(index)} is cut short; {self.fix}")
        finally:
            os.close(fd)
        return out

    def pixels(self, class_id, indices):
        """Cached pixels of records ``indices`` of class ``class_id``: a new uint8 ``N×3×s×s`` tensor."""
        return self.read(class_id, indices, torch.empty(_shape(len(indices), self.preprocess), dtype=torch.uint8))


def _build_class(records, directory, class_id):
    """Write ``<class_id>.npy`` atomically (via ``<class_id>.npy.tmp``); return ``class_id``.

    Pixels are rounded to the nearest grey level (the identity under ``center_crop``); bilinear
    resizing gives convex combinations of uint8 levels, so the rounded values fit in uint8.
    """
    n = records.spec.get_total_images_per_class(class_id)
    array = np.empty(_shape(n, records.preprocess), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        array[start:stop] = records.pixels(class_id, range(start, stop)).round().to(torch.uint8).numpy()
    path = directory / f"{class_id}.npy"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return class_id


def _built_classes(path, header):
    """The per-class entries of the ``cache.json`` or ``cache.partial.json`` at ``path``.

    Only a file written for the same source, resize and size counts (whatever its spec); {} otherwise.
    Entries of format 1 have no content fingerprint; their record file's size stands for it (what a
    format-1 build checked), so upgrading a cache decodes only the classes whose records changed size.
    """
    try:
        meta = json.loads(path.read_text())
        same = meta["format"] in (1, FORMAT) and all(meta[key] == header[key] for key in ("source", "image_size", "resize"))
        return dict(meta["classes"]) if same else {}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def build_source(cache, records, workers=1):
    """Build, resume or refresh the decoded cache of one source; return the one-line summary.

    A class is kept when its file has the shape the spec gives and its record file the size and count
    recorded when it was built; every other class is decoded (`SourceRecords.pixels`) and written.
    ``cache.json`` is removed first and written last, so the cache is read only when complete.

    Args:
        cache: the `DecodedCache` to build in.
        records: the source's `SourceRecords` (its spec and preprocessing decide what is written).
        workers: processes building classes in parallel; the files do not depend on it.

    Raises:
        DataError: a record file is missing, corrupt or disagrees with the spec.
    """
    began = time.perf_counter()
    name, spec, preprocess = records.source.name, records.spec, records.preprocess
    directory = cache.directory(name, preprocess)
    directory.mkdir(parents=True, exist_ok=True)
    header = _header(name, spec, preprocess)
    built = {**_built_classes(directory / META, header), **_built_classes(directory / PARTIAL, header)}
    entries, todo = {}, {}
    for c in range(spec.num_classes):
        record_file, before = records.record_file(c), built.get(str(c), {})
        entry = {**_file_state(record_file.path), "records": spec.get_total_images_per_class(c)}
        unchanged = all(before.get(key) == value for key, value in entry.items()) and "content" in before
        entry["content"] = before["content"] if unchanged else record_file.fingerprint()
        present = _pixel_offset(directory / f"{c}.npy", _shape(entry["records"], preprocess)) is not None
        if "content" in before:
            same_content = before["content"] == entry["content"]
        else:  # a format-1 entry: the record file's size stood for its content
            same_content = before.get("bytes") == entry["bytes"]
        if present and before.get("records") == entry["records"] and same_content:
            entries[str(c)] = entry
        else:
            todo[c] = entry
    write_json(directory / PARTIAL, {**header, "classes": entries})
    (directory / META).unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        # The pool is forked before tqdm starts its monitor thread; one torch thread per process.
        pool = None if workers == 1 else stack.enter_context(multiprocessing.Pool(workers, torch.set_num_threads, (1,)))
        bar = stack.enter_context(
            tqdm(total=sum(e["records"] for e in todo.values()), desc=name, unit="img", disable=None)
        )
        job = partial(_build_class, records, directory)
        for c in map(job, todo) if pool is None else pool.imap_unordered(job, todo):
            entries[str(c)] = todo[c]
            write_json(directory / PARTIAL, {**header, "classes": entries})
            bar.update(todo[c]["records"])
    write_json(directory / META, {**header, "classes": {str(c): entries[str(c)] for c in range(spec.num_classes)}})
    (directory / PARTIAL).unlink()
    images = sum(e["records"] for e in entries.values())
    size = sum(directory.joinpath(f"{c}.npy").stat().st_size for c in range(spec.num_classes))
    return (
        f"{name}: {spec.num_classes} classes ({len(todo)} built, {spec.num_classes - len(todo)} up to date), {images} images, "
        f"{size / 2**20:.1f} MiB in {directory}, {time.perf_counter() - began:.1f} s"
    )


def verify_source(cache, records, per_class=None):
    """Check the decoded cache of one source against its spec and records; return the one-line summary.

    Checks ``cache.json`` against the spec and the record files' sizes and times (`DecodedSource`), every
    record file's content fingerprint against the one the cache was built from, every class file's
    shape, and re-decodes every record (or ``per_class`` random ones per class, drawn by a generator
    seeded with the class id): the cached pixels must equal
    `SourceRecords.pixels` under ``center_crop`` and be within 0.5 grey level of them under ``squash``.

    Raises:
        DataError: the first fault; names the file (and the record) and the build command.
    """
    began = time.perf_counter()
    name, spec = records.source.name, records.spec
    decoded = cache.open(name, spec, records.preprocess)
    tolerance = TOLERANCE[records.preprocess.resize]
    checked = total = 0
    for c in tqdm(range(spec.num_classes), desc=name, unit="class", disable=None):
        record_file = records.record_file(c)
        if record_file.fingerprint() != decoded.classes[str(c)].get("content"):
            raise DataError(f"{record_file.path}: its records are not those {decoded.class_path(c)} was built from; "
                            f"{decoded.fix}")
        n = decoded.records_in(c)
        if per_class is None:
            picked = np.arange(n)
        else:
            picked = np.sort(np.random.default_rng(c).choice(n, min(per_class, n), replace=False))
        for start in range(0, len(picked), CHUNK):
            chunk = picked[start : start + CHUNK]
            error = (decoded.pixels(c, chunk).float() - records.pixels(c, chunk)).abs().amax(dim=(1, 2, 3))
            bad = torch.nonzero(error > tolerance).flatten()
            if len(bad):
                i, worst = int(chunk[bad[0]]), float(error[bad[0]])
                raise DataError(
                    f"{decoded.class_path(c)}: record {i} differs from record {i} of {record_file.path} by {worst:g} grey levels "
                    f"(allowed: {tolerance:g}); delete {decoded.class_path(c)} and {decoded.fix}"
                )
        checked, total = checked + len(picked), total + n
    agreement = "equal" if tolerance == 0 else f"within {tolerance:g} grey level"
    return (
        f"{name}: {spec.num_classes} classes, {checked} of {total} cached images match their records ({agreement}) "
        f"in {time.perf_counter() - began:.1f} s"
    )


def _sources(args):
    """The cache and the `SourceRecords` (records decoded, not cached) that a command works on."""
    data = BenchmarkData(args.benchmark, args.records)
    root = args.cache or os.environ.get(DECODED_ENV) or data.records_root / "decoded"
    cache = DecodedCache(root, data.benchmark.name, data.records_root)
    return cache, [data.source(name) for name in args.sources or data.sources]


def main(argv=None):
    parser = CommandParser(prog="python -m benchmark.cache", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="decode and resize the records of a benchmark's sources into the cache")
    verify = commands.add_parser("verify", help="check a built cache against the specs and by re-decoding records")
    for command in (build, verify):
        command.add_argument("benchmark", metavar="BENCHMARK",
                             help="a benchmark of registry/benchmarks.toml; its preprocessing decides the resize")
        command.add_argument("--sources", nargs="+", metavar="NAME", help="only these sources (default: all it uses)")
        command.add_argument("--records", metavar="ROOT",
                             help="records root (default: as benchmark.run, e.g. $SMAT_BENCH_RECORDS)")
        command.add_argument("--cache", metavar="DIR", help=f"cache root (default: ${DECODED_ENV}, else ROOT/decoded)")
    build.add_argument("--workers", metavar="N", type=int, default=1, help="processes building classes (default 1)")
    verify.add_argument("--per-class", metavar="K", type=int,
                        help="re-decode K random records per class (default: all)")
    args = parser.parse_args(argv)
    with exit_on_error(parser.prog):
        if args.command == "build" and args.workers < 1:
            raise DataError(f"--workers is {args.workers}; it must be at least 1")
        if args.command == "verify" and args.per_class is not None and args.per_class < 1:
            raise DataError(f"--per-class is {args.per_class}; at least 1 (leave it out to check all records)")
        cache, sources = _sources(args)
        for records in sources:
            if args.command == "build":
                print(build_source(cache, records, args.workers), flush=True)
            else:
                print(verify_source(cache, records, args.per_class), flush=True)


if __name__ == "__main__":
    main()
