"""Convert the raw data sets smat-bench adds to Meta-Dataset into Meta-Dataset records.

``python -m registry.convert NAME --raw RAW_DIR --out RECORDS_ROOT [--workers N]`` writes
``RECORDS_ROOT/NAME/`` exactly like an official conversion (reference §1): ``dataset_spec.json``
(a flat `DatasetSpecification`) and one ``<class_id>.tfrecords`` per class, each record a
``tf.train.Example`` {image, label = absolute class id}. traffic_sign, mscoco and the eight
Meta-Dataset training sources are not converted here: they come from the official Meta-Dataset
conversion.

Raw data is read through torchvision's dataset classes (``download=False``, RAW_DIR is their
``root``) for mnist, cifar10, cifar100, pet, food and cars, and from DomainNet's class folders for
sketch and clipart. Splits and class ids:

* mnist, cifar10, cifar100: every class in TEST, images from the official test set. Ids and names as
  the extended Meta-Dataset specs (CNAPs): mnist ``class_0``..``class_9``; CIFAR label names sorted
  alphabetically. CIFAR's files are pickles, which can run code when read: the test batch and the meta
  file must have their published MD5s (torchvision's lists), or they are refused unread.
* pet, food, cars: every class in TEST, images from the data set's test split, ids in torchvision's
  class order.
* sketch, clipart: TRAIN/VALID/TEST classes from ``registry/data/domainnet_class_splits.json``
  (207/51/87 class-folder names); ids enumerate the train names, then valid, then test, each in the
  file's order. A class holds every file of its folder, sorted by file name.

Within a class, records follow the data set's own order (torchvision's index order; file names for
DomainNet).

Image bytes: a file that is a JPEG (it starts with FF D8) is stored byte for byte; any other file
(e.g. the PNG and GIF files with ``.jpg`` names in Oxford-IIIT Pet) is re-encoded losslessly as PNG.
Array sources (CIFAR, MNIST) are encoded once, losslessly, as PNG at native resolution: 32×32 RGB
for CIFAR, 28×28 greyscale for MNIST (the reader decodes every image to 3 channels). Unlike CNAPs,
nothing is upsampled to 84 px or re-compressed as JPEG: resizing belongs to the benchmark's
preprocessing, and the pixels are exactly the data set's.

Safety: the records are written into a hidden sibling ``RECORDS_ROOT/.NAME.partial-*/NAME``,
checked there (framing, CRCs, labels and counts with `benchmark.records.verify_source`, and the class
counts against ``registry/sources.toml`` with `Source.load_spec`), and only then moved to
``RECORDS_ROOT/NAME``. An interrupted or failed conversion therefore never leaves a
``RECORDS_ROOT/NAME`` behind, and never touches an existing one. Re-running replaces an existing
``RECORDS_ROOT/NAME`` as a whole, with two renames (old copy out, new copy in) once the new copy has
passed every check; the old copy is then deleted, or put back if the new one cannot move in (and kept
in ``.NAME.partial-*/replaced/``, named by the error, if it cannot go back either). A process killed
outright (SIGKILL, power loss) can leave a ``.NAME.partial-*`` directory; killed between the two
renames, it holds the old copy as ``replaced/`` (move that back to ``RECORDS_ROOT/NAME`` if there is
none), else it is safe to delete. Output is deterministic: the same raw data gives byte-identical files
for any ``--workers``; ``dataset_spec.json`` stores the official placeholder ``path``
(``/path/to/records/NAME``), which loaders replace with the real directory. A progress bar (images
written) goes to stderr when it is a terminal.

Adding a source: declare it in ``sources.toml`` with ``converter = "smat-bench"`` and write one
function ``RAW_DIR -> RawSource`` decorated with ``@register_converter(name, layout=..., url=...)``.
Reading errors it raises (``RuntimeError``, ``OSError``, ...) are reported with its ``layout``.

Example:
    >>> print(convert("cifar10", "/data/raw", "/data/records", workers=4))
    cifar10: wrote 10 classes (train/valid/test 0/0/10), 10000 images to /data/records/cifar10 in 9.8 s; \
verified (CRC, labels, counts) and matches sources.toml
"""

import contextlib
import hashlib
import io
import json
import multiprocessing
import pickle
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmark.records import encode_example, verify_source, write_records
from registry.catalog import SOURCES_FILE, get_source, list_sources
from registry.dataset_spec import DatasetSpecification, Split, dump_dataset_spec
from registry.errors import CommandParser, DataError, exit_on_error

__all__ = ["RawSource", "Converter", "register_converter", "get_converter", "list_converters", "convert", "main"]

JPEG_MAGIC = b"\xff\xd8"
DOMAINNET_SPLITS_FILE = Path(__file__).with_name("data") / "domainnet_class_splits.json"
MIN_IMAGES_PER_CLASS = 2  # the official sampler needs one support and one query image per class

# What reading a raw copy in the wrong layout raises: torchvision's "Dataset not found" (RuntimeError),
# missing files (OSError), and truncated or foreign pickles / .mat files.
_BAD_LAYOUT = (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError)


@dataclass(frozen=True)
class RawSource:
    """A raw data set as read by a converter: what to write, in class-id order.

    Attributes:
        class_names: class names; the position is the class id.
        classes_per_split: {Split: number of classes}; ids are contiguous by split (TRAIN, VALID, TEST).
        images: per class id, its images in record order, each either a `Path` (a file, read when the
            class is written) or a uint8 array (H×W or H×W×3 pixels, PNG-encoded when written).
    """

    class_names: tuple
    classes_per_split: dict
    images: tuple


@dataclass(frozen=True)
class Converter:
    """A registered converter: ``read(raw_dir) -> RawSource``, plus what RAW_DIR must hold and where to get it."""

    name: str
    read: Callable
    layout: str
    url: str


_CONVERTERS = {}


def register_converter(name, *, layout, url):
    """Decorator: register ``read(raw_dir) -> RawSource`` as the converter of source ``name``.

    Args:
        name: the source's name in ``sources.toml``.
        layout: what RAW_DIR must hold, quoted in errors and docs.
        url: where users get the raw data.

    Raises:
        ValueError: ``name`` is registered already.
    """

    def register(read):
        if name in _CONVERTERS:
            raise ValueError(f"converter {name!r} is registered twice")
        _CONVERTERS[name] = Converter(name=name, read=read, layout=layout, url=url)
        return read

    return register


def list_converters():
    """Names of the sources `convert` handles, sorted."""
    return sorted(_CONVERTERS)


def get_converter(name):
    """The `Converter` of ``name``.

    Raises:
        DataError: ``name`` has no converter; the message lists the valid names and says which sources
            come from the official Meta-Dataset conversion.
    """
    if name in _CONVERTERS:
        return _CONVERTERS[name]
    official = [n for n in list_sources() if get_source(n).converter == "official"]
    what = f"is not converted here ({get_source(name).how_to_fix()})" if name in list_sources() else "is unknown"
    raise DataError(
        f"source {name!r} {what}; registry.convert converts {', '.join(list_converters())}. "
        f"{', '.join(official)} come from the official Meta-Dataset conversion (its dataset_conversion docs)"
    )


# --- converters ----------------------------------------------------------------------------------


def _torchvision_datasets():
    """``torchvision.datasets``, imported on first use: importing torch takes seconds, which the CLI's
    ``--help`` and its argument errors should not wait for."""
    import torchvision.datasets

    return torchvision.datasets


def _test_only(class_names, labels, images):
    """A `RawSource` with every class in TEST; image ``i`` goes to class ``labels[i]``."""
    per_class = [[] for _ in class_names]
    for label, image in zip(labels, images, strict=True):
        if not 0 <= label < len(per_class):
            raise KeyError(f"label {label} is outside the {len(per_class)} classes")
        per_class[label].append(image)
    return RawSource(
        class_names=tuple(class_names),
        classes_per_split={Split.TRAIN: 0, Split.VALID: 0, Split.TEST: len(class_names)},
        images=tuple(map(tuple, per_class)),
    )


def _published_md5s(cifar):
    """{file name: published MD5} of the files read from torchvision's CIFAR class ``cifar``: the test batch and
    the meta file (torchvision's ``test_list`` and ``meta``)."""
    return {**dict(cifar.test_list), cifar.meta["filename"]: cifar.meta["md5"]}


def _verified(cifar, raw_dir):
    """``cifar`` reading the test batch and the meta file, once their MD5s are checked to be the published ones.

    Both are pickles, and unpickling runs whatever code a file holds: a file that is not the official one
    is refused before anything opens it. The train batches are not needed.

    Raises:
        DataError: a file's MD5 is not the published one; says where to get the official archive.
        OSError: a file is missing (`_read` reports it with the layout).
    """
    folder = raw_dir / cifar.base_folder
    md5s = _published_md5s(cifar)
    for filename, md5 in md5s.items():
        with open(folder / filename, "rb") as f:
            found = hashlib.file_digest(f, "md5").hexdigest()
        if found != md5:
            raise DataError(
                f"{folder / filename}: MD5 {found} is not the published {md5}, so it is not the official file; "
                f"it is a pickle, which could run any code, so it is not read; re-download the official "
                f"{cifar.url} (MD5 {cifar.tgz_md5}) and extract it into --raw"
            )
    return type(
        cifar.__name__,
        (cifar,),
        {"train_list": [], "test_list": [[f, md5s[f]] for f, _ in cifar.test_list],
         "meta": {**cifar.meta, "md5": md5s[cifar.meta["filename"]]}},
    )


def _read_cifar(cifar_name, raw_dir):
    """The test set of torchvision's ``cifar_name`` class; ids are the label names' alphabetical positions."""
    cifar = _verified(getattr(_torchvision_datasets(), cifar_name), raw_dir)
    dataset = cifar(raw_dir, train=False, download=False)
    names = sorted(dataset.classes)
    class_id = [names.index(n) for n in dataset.classes]  # torchvision label -> class id
    return _test_only(names, [class_id[t] for t in dataset.targets], list(dataset.data))


_CIFAR_URL = (
    "https://www.cs.toronto.edu/~kriz/cifar.html (python version), "
    "or torchvision {}(RAW_DIR, train=False, download=True)"
)


@register_converter(
    "cifar10",
    layout="cifar-10-batches-py/test_batch and cifar-10-batches-py/batches.meta",
    url=_CIFAR_URL.format("CIFAR10"),
)
def _read_cifar10(raw_dir):
    return _read_cifar("CIFAR10", raw_dir)


@register_converter(
    "cifar100", layout="cifar-100-python/test and cifar-100-python/meta", url=_CIFAR_URL.format("CIFAR100")
)
def _read_cifar100(raw_dir):
    return _read_cifar("CIFAR100", raw_dir)


@register_converter(
    "mnist",
    layout="MNIST/raw/t10k-images-idx3-ubyte and MNIST/raw/t10k-labels-idx1-ubyte (unzipped)",
    url="https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror), "
    "or torchvision MNIST(RAW_DIR, train=False, download=True)",
)
def _read_mnist(raw_dir):
    mnist = _torchvision_datasets().MNIST
    # Named MNIST because torchvision derives the folder (RAW_DIR/MNIST/raw) from the class name; only
    # the t10k files are required.
    test_only = type("MNIST", (mnist,), {"resources": [r for r in mnist.resources if r[0].startswith("t10k")]})
    dataset = test_only(raw_dir, train=False, download=False)
    return _test_only([f"class_{d}" for d in range(10)], dataset.targets.tolist(), list(dataset.data.numpy()))


# pet, food and cars keep the files' own bytes, so they read torchvision's (private) lists of image
# paths and labels rather than the decoded images `__getitem__` returns.


@register_converter(
    "pet",
    layout="oxford-iiit-pet/images/<image_id>.jpg and oxford-iiit-pet/annotations/test.txt",
    url="https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz), "
    "or torchvision OxfordIIITPet(RAW_DIR, split='test', download=True)",
)
def _read_pet(raw_dir):
    dataset = _torchvision_datasets().OxfordIIITPet(raw_dir, split="test", download=False)
    return _test_only(dataset.classes, dataset._labels, dataset._images)


@register_converter(
    "food",
    layout="food-101/meta/test.json and food-101/images/<class>/<image>.jpg",
    url="https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/, "
    "or torchvision Food101(RAW_DIR, split='test', download=True)",
)
def _read_food(raw_dir):
    dataset = _torchvision_datasets().Food101(raw_dir, split="test", download=False)
    return _test_only(dataset.classes, dataset._labels, dataset._image_files)


@register_converter(
    "cars",
    layout="stanford_cars/devkit/cars_meta.mat, stanford_cars/cars_test_annos_withlabels.mat "
    "and stanford_cars/cars_test/<fname>.jpg",
    url="the original site is offline: a mirror of the Stanford Cars test images, devkit and "
    "cars_test_annos_withlabels.mat (see torchvision's StanfordCars docs)",
)
def _read_cars(raw_dir):
    dataset = _torchvision_datasets().StanfordCars(raw_dir, split="test", download=False)
    paths, labels = zip(*dataset._samples)
    return _test_only(dataset.classes, [int(t) for t in labels], [Path(p) for p in paths])


@cache
def _domainnet_splits():
    """{"train"|"valid"|"test": [class-folder names]} of the packaged DomainNet class split."""
    try:
        return json.loads(DOMAINNET_SPLITS_FILE.read_text())
    except FileNotFoundError:
        raise DataError(f"{DOMAINNET_SPLITS_FILE}: no such file; reinstall smat-bench") from None


def _read_domainnet(domain, raw_dir):
    """DomainNet ``domain``: RAW_DIR is the DomainNet root holding ``domain/`` or that folder itself."""
    folder = raw_dir / domain if (raw_dir / domain).is_dir() else raw_dir
    splits = _domainnet_splits()
    names = [n for split in ("train", "valid", "test") for n in splits[split]]
    missing = [n for n in names if not (folder / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(names)} class folders are missing from {folder} "
            f"(e.g. {', '.join(missing[:3])})"
        )
    return RawSource(
        class_names=tuple(names),
        classes_per_split={Split.parse(s): len(splits[s]) for s in ("train", "valid", "test")},
        images=tuple(
            tuple(sorted(p for p in (folder / n).iterdir() if p.is_file() and not p.name.startswith(".")))
            for n in names
        ),
    )


for _domain in ("sketch", "clipart"):
    register_converter(
        _domain,
        layout=f"{_domain}/<class>/<image> for all 345 DomainNet classes (or RAW_DIR = the {_domain} folder itself)",
        url=f"http://ai.bu.edu/M3SDA/ ({_domain}.zip)",
    )(partial(_read_domainnet, _domain))


# --- writing -------------------------------------------------------------------------------------


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_bytes(image):
    """The record bytes of one image: a JPEG file's own bytes; any other file or array as lossless PNG.

    Raises:
        DataError: a file is missing or not an image PIL can read and write as PNG; names the file.
    """
    if isinstance(image, np.ndarray):
        return _png(Image.fromarray(image))
    try:
        data = image.read_bytes()
        if data.startswith(JPEG_MAGIC):
            return data
        with Image.open(io.BytesIO(data)) as decoded:
            return _png(decoded)
    except OSError as err:  # includes PIL's UnidentifiedImageError
        raise DataError(f"{image}: cannot read or re-encode this image ({err}); re-extract the data set") from None


def _write_class(job):
    """Write one class file; ``job`` is (directory, class_id, images). Returns the record count."""
    directory, class_id, images = job
    return write_records(
        directory / f"{class_id}.tfrecords", (encode_example(_image_bytes(image), class_id) for image in images)
    )


def _read(converter, raw_dir):
    """``converter.read(raw_dir)``, with every reading error turned into one `DataError` naming the layout."""
    if not raw_dir.is_dir():
        raise DataError(f"--raw {raw_dir}: no such directory; it must hold {converter.layout}")
    try:
        raw = converter.read(raw_dir)
    except _BAD_LAYOUT as err:
        raise DataError(
            f"--raw {raw_dir}: not a {converter.name} copy in the expected layout ({type(err).__name__}: {err}); "
            f"RAW_DIR must hold {converter.layout}; get it from {converter.url}"
        ) from None
    small = [
        f"class {i} {name!r} ({len(images)} image{'s' * (len(images) != 1)})"
        for i, (name, images) in enumerate(zip(raw.class_names, raw.images))
        if len(images) < MIN_IMAGES_PER_CLASS
    ]
    if small:
        raise DataError(
            f"--raw {raw_dir}: {converter.name} has fewer than {MIN_IMAGES_PER_CLASS} images in "
            f"{', '.join(small[:5])}{' ...' if len(small) > 5 else ''}; the Meta-Dataset sampler needs one support "
            "and one query image per class; check that the copy is complete"
        )
    return raw


def _write(raw, name, directory, workers):
    """Write every class file and ``dataset_spec.json`` of ``raw`` into ``directory``; return the image count."""
    jobs = [(directory, class_id, images) for class_id, images in enumerate(raw.images)]
    counts = []
    with contextlib.ExitStack() as stack:
        # The pool is forked before tqdm starts its monitor thread.
        mapper = map if workers == 1 else stack.enter_context(multiprocessing.Pool(workers)).imap
        bar = stack.enter_context(
            tqdm(total=sum(map(len, raw.images)), desc=name, unit="img", disable=not sys.stderr.isatty())
        )
        for count in mapper(_write_class, jobs):
            counts.append(count)
            bar.update(count)
    spec = DatasetSpecification(
        name=name,
        classes_per_split=raw.classes_per_split,
        images_per_class=dict(enumerate(counts)),
        class_names=dict(enumerate(raw.class_names)),
        path=f"/path/to/records/{name}",  # the official placeholder; loaders replace it with the real directory
    )
    dump_dataset_spec(spec, directory)
    return sum(counts)


def convert(name, raw_dir, records_root, workers=1):
    """Convert source ``name`` from ``raw_dir`` into ``records_root/name``; return a one-line summary.

    The records are written and checked in a hidden sibling directory and moved into place only when
    sound (see the module docstring), replacing an existing ``records_root/name`` as a whole.

    Args:
        name: a name from `list_converters`.
        raw_dir: the raw data set, laid out as the converter's ``layout`` says (torchvision's ``root``).
        records_root: the directory holding converted sources; created if missing.
        workers: processes writing class files in parallel; the output does not depend on it.

    Raises:
        DataError: unknown name, wrong layout, a class with fewer than two images, an unreadable
            image, or records that fail verification or disagree with ``sources.toml``.
    """
    began = time.perf_counter()
    converter = get_converter(name)
    if workers < 1:
        raise DataError(f"--workers is {workers}; it must be at least 1")
    raw = _read(converter, Path(raw_dir).expanduser())
    records_root = Path(records_root).expanduser()
    records_root.mkdir(parents=True, exist_ok=True)
    final = records_root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=records_root))
    stranded = False  # the old copy is in the staging directory and could not go back: keep it
    try:
        directory = staging / name
        directory.mkdir()
        total = _write(raw, name, directory, workers)
        verify_source(directory)
        get_source(name).load_spec(staging)
        replaced = staging / "replaced"  # deleted with the staging directory once the new copy is in place
        if final.exists() or final.is_symlink():
            final.rename(replaced)
        try:
            directory.rename(final)
        except BaseException as err:
            if replaced.exists() or replaced.is_symlink():
                try:
                    replaced.rename(final)  # the old copy goes back
                except BaseException as restore_err:
                    stranded = True
                    raise DataError(
                        f"{final}: the new copy could not be moved in ({err}) nor the old copy back ({restore_err}); "
                        f"both are kept: the old copy at {replaced}, the verified new one at {directory}; move "
                        f"one of them to {final} by hand"
                    ) from err
            raise
    finally:
        if not stranded:
            shutil.rmtree(staging, ignore_errors=True)
    splits = "/".join(str(raw.classes_per_split[s]) for s in Split)
    return (
        f"{name}: wrote {len(raw.class_names)} classes (train/valid/test {splits}), {total} images to {final} "
        f"in {time.perf_counter() - began:.1f} s; verified (CRC, labels, counts) and matches {SOURCES_FILE.name}"
    )


def main(argv=None):
    parser = CommandParser(prog="python -m registry.convert", description=__doc__.split("\n")[0])
    parser.add_argument("name", metavar="NAME", help=f"the source to convert: {', '.join(list_converters())}")
    parser.add_argument(
        "--raw", metavar="RAW_DIR", type=Path, required=True, help="the raw data set (torchvision's root)"
    )
    parser.add_argument("--out", metavar="RECORDS_ROOT", type=Path, required=True, help="writes RECORDS_ROOT/NAME/")
    parser.add_argument("--workers", metavar="N", type=int, default=1, help="processes writing class files (default 1)")
    args = parser.parse_args(argv)
    with exit_on_error(parser.prog):
        print(convert(args.name, args.raw, args.out, workers=args.workers))


if __name__ == "__main__":
    main()
