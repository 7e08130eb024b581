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
