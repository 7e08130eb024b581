"""Pre-trained weights of the mini backbone: cached per everything that shapes them."""

import dataclasses

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
