"""Pre-trained weights of the mini backbone: cached per everything that shapes them."""

import dataclasses
import os
import stat

import pytest
import torch

from benchmark import pretrain
from benchmark.episodes import BenchmarkData
from methods import MINI_BACKBONE
from registry.catalog import get_benchmark


def test_weights_are_cached_per_preprocessing(mini_root, monkeypatch):
    """Another preprocessing of the same sources (e.g. the official [-1, 1] inputs) trains its own weights."""
    trained = []

    def fake_train(data, backbone_name, steps):
        trained.append(data.benchmark.preprocessing)
        return {"weight": torch.zeros(1)}

    monkeypatch.setattr(pretrain, "_train", fake_train)
    paper = get_benchmark("md_mini")
    official = dataclasses.replace(paper, name="md_mini_official", preprocessing="official")
    paths = [pretrain.pretrained_weights(BenchmarkData(b, mini_root), MINI_BACKBONE, steps=1) for b in (paper, official)]
    try:
        assert paths[0] != paths[1] and trained == ["paper", "official"]
        assert pretrain.pretrained_weights(BenchmarkData(paper, mini_root), MINI_BACKBONE, steps=1) == paths[0]
        assert len(trained) == 2  # the second call found the cached file
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def test_the_cache_file_is_written_through_a_temporary_file_of_its_own(mini_root, monkeypatch):
    """Jobs on several nodes (one process id each, maybe the same) pre-training at once never share a temporary
    file, and a failed write leaves neither the cache file nor its temporary file."""
    monkeypatch.setattr(pretrain, "_train", lambda data, backbone_name, steps: {"weight": torch.zeros(1)})
    temporaries, real_save = [], pretrain.save_file

    def save_then_fail(state, path):
        temporaries.append(path)
        real_save(state, path)
        if len(temporaries) == 2:
            raise OSError("planted: disk full")

    monkeypatch.setattr(pretrain, "save_file", save_then_fail)
    data = BenchmarkData(get_benchmark("md_mini"), mini_root)
    path = pretrain.pretrained_weights(data, MINI_BACKBONE, steps=2)
    try:
        path.unlink()
        with pytest.raises(OSError, match="planted"):
            pretrain.pretrained_weights(data, MINI_BACKBONE, steps=2)
        assert temporaries[0] != temporaries[1]
        assert not path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")]
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_cache_file_has_the_mode_the_umask_gives(mini_root, monkeypatch, umask):
    """Other users of a shared records root can read the weights when the umask lets them (safetensors itself
    writes every file with mode 0600)."""
    monkeypatch.setattr(pretrain, "_train", lambda data, backbone_name, steps: {"weight": torch.zeros(1)})
    data = BenchmarkData(get_benchmark("md_mini"), mini_root)
    previous = os.umask(umask)
    try:
        path = pretrain.pretrained_weights(data, MINI_BACKBONE, steps=3)
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    finally:
        path.unlink()
