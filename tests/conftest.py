"""Shared fixtures: paths into ``tests/data/shared`` (a snapshot of the reference data, see its README) and the project root."""

import json
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT / "tests" / "data" / "shared"
CONFORMANCE = SHARED / "conformance"
SPECS = CONFORMANCE / "specs"
SAMPLER = CONFORMANCE / "sampler"


def _require(path):
    if not path.exists():
        pytest.fail(f"{path} is missing from the checkout: restore tests/data/ with git checkout")
    return path


@pytest.fixture(scope="session")
def project_root():
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def specs_dir():
    return _require(SPECS)


@pytest.fixture(scope="session")
def toy_spec_path():
    return _require(SAMPLER / "toy" / "dataset_spec.json")


@pytest.fixture(scope="session")
def golden_manifest():
    return json.loads(_require(SAMPLER / "manifest.json").read_text())


def png_bytes(pixels):
    """A uint8 H×W×3 array encoded as PNG (lossless)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def planted_pickle(marker):
    """Pickle bytes that, when unpickled, create the directory ``marker``: what a planted pickle could do, harmlessly."""
    import pickle

    return pickle.dumps(_Planted(marker))


def _uniform(class_id, index):
    import numpy as np

    return np.full((10, 12, 3), pixel_code(class_id, index), dtype=np.uint8)


def pixel_code(class_id, index):
    """The uniform colour of record ``index`` of class ``class_id`` in `write_source` sources."""
    return (class_id * 9 % 256, index % 256, 200)


@pytest.fixture
def write_source(tmp_path):
    """Factory: write a flat source whose record i of class c is a uniform 12×10 PNG of colour ``pixel_code(c, i)``.

    ``write_source(name, counts=(train, valid, test), images=n or [n_0, n_1, ...], draw=None)`` -> its
    directory; ``draw(c, i)``, a uint8 H×W×3 array, replaces the uniform colour.
    """
    from benchmark.records import encode_example, write_records
    from registry.dataset_spec import DatasetSpecification, Split, dump_dataset_spec

    def write(name, counts, images, draw=None):
        directory = tmp_path / name
        directory.mkdir(parents=True)
        total = sum(counts)
        sizes = images if isinstance(images, list) else [images] * total
        draw = draw or _uniform
        for c in range(total):
            write_records(directory / f"{c}.tfrecords", (encode_example(png_bytes(draw(c, i)), c) for i in range(sizes[c])))
        spec = DatasetSpecification(
            name=name, classes_per_split=dict(zip(Split, counts)), images_per_class=dict(enumerate(sizes)),
            class_names={c: f"c{c}" for c in range(total)}, path=str(directory),
        )
        dump_dataset_spec(spec, directory)
        return directory

    return write


@pytest.fixture(scope="session", autouse=True)
def bench_cache(tmp_path_factory):
    """A private SMAT_BENCH_CACHE for the whole session (and its subprocesses): tests never touch ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("smat-bench-cache")
    previous = os.environ.get("SMAT_BENCH_CACHE")
    os.environ["SMAT_BENCH_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SMAT_BENCH_CACHE", None)
    else:
        os.environ["SMAT_BENCH_CACHE"] = previous


@pytest.fixture(scope="session")
def mini_root(bench_cache):
    """The embedded mini benchmark, generated once per test session into the session cache."""
    from registry.mini import ensure_mini

    return ensure_mini()


@pytest.fixture(autouse=True)
def fresh_gin_config():
    """Gin bindings are process-global: a run parsed in one test must not configure the next test's methods."""
    import gin

    yield
    gin.clear_config()
