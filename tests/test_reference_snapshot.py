"""``tests/data/shared`` is a verbatim snapshot of the development reference data in ``../shared``."""

from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).resolve().parent / "data" / "shared"
ORIGINAL = Path(__file__).resolve().parents[2] / "shared"
FILES = sorted(p.relative_to(SNAPSHOT) for p in SNAPSHOT.rglob("*") if p.is_file())


def test_the_snapshot_holds_the_specs_the_goldens_and_the_published_numbers():
    names = {str(p) for p in FILES}
    assert {"conformance/sampler/manifest.json", "reference/published_accuracy.csv",
            "reference/domainnet_class_splits.json", "conformance/specs/ilsvrc_2012/dataset_spec.json"} <= names
    assert len([p for p in FILES if p.name == "dataset_spec.json"]) == 14  # 13 sources and the toy spec


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason="../shared is not beside the project (a user's clone)")
@pytest.mark.parametrize("path", FILES, ids=str)
def test_each_snapshot_file_is_a_verbatim_copy(path):
    assert (SNAPSHOT / path).read_bytes() == (ORIGINAL / path).read_bytes()
