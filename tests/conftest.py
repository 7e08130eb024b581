"""Shared fixtures: paths into ``../shared/conformance`` (development reference data) and the project root."""

import json
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
CONFORMANCE = SHARED / "conformance"
SPECS = CONFORMANCE / "specs"
SAMPLER = CONFORMANCE / "sampler"


def _require(path):
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need the reference data in ../shared/ beside the project root")
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


def _png(color, size=(12, 10)):
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_code(class_id, index):
    """The uniform colour of record ``index`` of class ``class_id`` in `write_source` sources."""
    return (class_id * 9 % 256, index % 256, 200)


@pytest.fixture
def write_source(tmp_path):
    """Factory: write a flat source whose record i of class c is a uniform PNG of colour ``pixel_code(c, i)``.

    ``write_source(name, counts=(train, valid, test), images=n or [n_0, n_1, ...])`` -> its directory.
    """
    from benchmark.records import encode_example, write_records
    from registry.dataset_spec import DatasetSpecification, Split, dump_dataset_spec

    def write(name, counts, images):
        directory = tmp_path / name
        directory.mkdir(parents=True)
        total = sum(counts)
        sizes = images if isinstance(images, list) else [images] * total
        for c in range(total):
            write_records(directory / f"{c}.tfrecords", (encode_example(_png(pixel_code(c, i)), c) for i in range(sizes[c])))
        spec = DatasetSpecification(
            name=name, classes_per_split=dict(zip(Split, counts)), images_per_class=dict(enumerate(sizes)),
            class_names={c: f"c{c}" for c in range(total)}, path=str(directory),
        )
        dump_dataset_spec(spec, directory)
        return directory

    return write


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory):
    """The embedded mini benchmark, generated once per test session into a temporary cache."""
    from registry.mini import generate

    return generate(tmp_path_factory.mktemp("cache") / "mini")
