"""Meta-testing on the mini benchmark: adapters, the lr search on validation episodes, paired episodes, resume."""

import json

import pytest
import torch

from benchmark import evaluate as evaluation
from benchmark.episodes import BenchmarkData
from benchmark.evaluate import choose_lr, evaluate, search_basis
from benchmark.results import ROW_KEYS, ResultsStore, mean_ci
from methods import MINI_BACKBONE, Task, create_backbone, create_method
from methods.adapters import ADAPTERS, get_adapter, seeded_generator, split_qkv

RUN_INFO = dict(run_id="r", method="m", variant="default", backbone=MINI_BACKBONE, config_hash="h", code_version="c")


@pytest.fixture(scope="module")
def data(mini_root):
    return BenchmarkData("md_mini", mini_root)


def smat():
    torch.manual_seed(0)
    return create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False))


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_every_adapter_runs_on_smat_and_gives_an_accuracy(data, adapter):
    method = smat()
    episode = data.eval_episodes("mini_digits", "test", num_episodes=1)[0]
    task = Task.from_episode(episode)
    predictions = get_adapter(adapter, method)(method, task, 1e-3, seeded_generator(0))
    accuracy = float((predictions == task.query_y).float().mean())
    assert predictions.shape == task.query_y.shape and 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_fine_tuning_with_lr_zero_equals_protonet(data, adapter):
    method = create_method("pmf", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
    task = Task.from_episode(data.eval_episodes("mini_shapes", "test", num_episodes=1)[0])
    protonet = get_adapter("protonet")(method, task, 0.0, seeded_generator(0))
    assert torch.equal(get_adapter(adapter)(method, task, 0.0, seeded_generator(0)), protonet)


def test_full_fine_tuning_changes_predictions_and_leaves_the_method_untouched(data):
    method = create_method("pre", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
    before = {n: p.clone() for n, p in method.backbone.named_parameters()}
    task = Task.from_episode(data.eval_episodes("mini_shapes", "test", num_episodes=1)[0])
    logits_before = method.task_model(task.support_x, task.support_y, task.ways).logits(task.query_x)
    get_adapter("full")(method, task, 1e-2, seeded_generator(0))
    assert all(torch.equal(p, before[n]) for n, p in method.backbone.named_parameters())
    assert torch.equal(method.task_model(task.support_x, task.support_y, task.ways).logits(task.query_x), logits_before)


def test_split_qkv_computes_the_same_function():
    torch.manual_seed(0)
    backbone = create_backbone(MINI_BACKBONE, pretrained=False)
    x = torch.randn(3, 3, 32, 32)
    expected = backbone(x)
    assert torch.allclose(split_qkv(backbone)(x), expected, atol=1e-5)
    assert hasattr(backbone.blocks[0].attn.qkv, "q") and hasattr(backbone.blocks[0].attn.qkv, "v")


def test_expert_adapters_refuse_methods_without_experts():
    pmf = create_method("pmf", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
    with pytest.raises(ValueError, match="needs SMAT's experts"):
        get_adapter("gradient_free", pmf)


def test_lr_search_never_sees_a_test_image(data, tmp_path, monkeypatch):
    """A source with validation classes searches on its own VALID episodes; the test-only sources share one
    search on the VALID episodes of the benchmark's validation sources."""
    assert search_basis(data, "mini_shapes", 3)[0] == ["mini_shapes"]
    validation = [s.name for s in data.benchmark.valid_sources]
    sources, basis = search_basis(data, "mini_digits", 3)  # test-only source
    assert sources == validation and "this source has no validation classes" in basis
    searched = []

    def score(method, adapter, episode, lr, device, task=None):
        searched.append(episode.id)
        return lr, 0.0, None

    monkeypatch.setattr(evaluation, "adapt_and_score", score)
    cache = tmp_path / "lr_search.json"
    for source in ("mini_digits", "mini_sketch"):
        assert choose_lr(None, "full", data, source, (0.0, 1e-3), 3, "cpu", cache)[0] == 1e-3
    assert {episode.split for episode in searched} == {"valid"}
    assert sorted({episode.source for episode in searched}) == sorted(validation)
    assert len(searched) == 2 * 3 * len(validation)  # one search (2 lrs × 3 episodes per source) for both sources


def test_a_run_begun_before_searches_were_shared_keeps_its_choice(data, tmp_path, monkeypatch):
    """Its rows of a test-only source already carry that lr: the rest of them must too."""
    kept = {"lr": 0.01, "basis": "grid search on test split, seed 1000003, episodes 0-2"}
    cache = tmp_path / "lr_search.json"
    cache.write_text(json.dumps({"full/mini_digits": {**kept, "accuracy_by_lr": {}}}))
    monkeypatch.setattr(evaluation, "adapt_and_score", lambda *a, **k: pytest.fail("the kept choice is reused"))
    assert choose_lr(None, "full", data, "mini_digits", (0.0, 0.01), 3, "cpu", cache) == (kept["lr"], kept["basis"])


def test_a_one_value_lr_grid_is_taken_without_a_search(data, monkeypatch):
    monkeypatch.setattr(evaluation, "adapt_and_score", lambda *a, **k: pytest.fail("nothing to choose"))
    assert choose_lr(None, "full", data, "mini_digits", (1e-4,), 3, "cpu") == (1e-4, "the only value of run.lr_grid")


def test_lr_search_picks_the_best_grid_value_and_keeps_it(data, tmp_path, monkeypatch):
    scores = {0.0: 0.3, 1e-3: 0.7, 1e-2: 0.7}  # a tie goes to the smaller lr
    monkeypatch.setattr(evaluation, "adapt_and_score", lambda m, a, e, lr, d, task=None: (scores[lr], 0.0, None))
    cache = tmp_path / "lr_search.json"
    lr, basis = choose_lr(None, "full", data, "mini_shapes", (0.0, 1e-3, 1e-2), 2, "cpu", cache)
    assert lr == 1e-3 and "valid split" in basis
    monkeypatch.setattr(evaluation, "adapt_and_score", lambda *a: pytest.fail("the kept choice is reused"))
    assert choose_lr(None, "full", data, "mini_shapes", (0.0, 1e-3, 1e-2), 2, "cpu", cache) == (lr, basis)
    assert json.loads(cache.read_text())["full/mini_shapes"]["accuracy_by_lr"] == {"0.0": 0.3, "0.001": 0.7, "0.01": 0.7}
    monkeypatch.setattr(evaluation, "adapt_and_score", lambda m, a, e, lr, d, task=None: (scores[lr], 0.0, None))
    assert choose_lr(None, "full", data, "mini_shapes", (1e-2, 1e-3, 0.0), 2, "cpu")[0] == 1e-3  # whatever the grid's order


def rows_of(store):
    return {(r["source"], r["episode"]): (r["ways"], r["support"], r["query"], r["seed"]) for r in store.rows}


def test_two_methods_see_identical_episodes_and_rows_follow_contract_c3(data, tmp_path):
    stores = []
    for name in ("pre", "pmf"):
        method = create_method(name, backbone=create_backbone(MINI_BACKBONE, pretrained=False))
        store = ResultsStore(tmp_path / name / "episodes.jsonl")
        evaluate(method, data, ["protonet"], store, {**RUN_INFO, "method": name}, num_episodes=3, progress=False)
        stores.append(store)
    assert rows_of(stores[0]) == rows_of(stores[1]) and len(stores[0].rows) == 6 * 3
    for row in stores[0].rows:
        assert set(ROW_KEYS) <= set(row) and 0 <= row["accuracy"] <= 1 and row["peak_memory_mib"] is None
        assert row["role"] in ("id", "ood") and row["split"] == "test" and row["lr_basis"] == "no learning rate"


def test_interrupted_evaluation_resumes_without_duplicates(data, tmp_path, monkeypatch):
    method = create_method("pre", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
    path = tmp_path / "episodes.jsonl"
    store = ResultsStore(path)
    original, calls = evaluation.adapt_and_score, []

    def dying(*args):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(evaluation, "adapt_and_score", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(method, data, ["protonet"], store, RUN_INFO, num_episodes=3, progress=False)
    with open(path, "a") as f:
        f.write('{"torn": ')  # a write cut short by the kill
    monkeypatch.setattr(evaluation, "adapt_and_score", original)
    resumed = ResultsStore(path)
    assert len(resumed.rows) == 7
    evaluate(method, data, ["protonet"], resumed, RUN_INFO, num_episodes=3, progress=False)
    keys = [(r["source"], r["episode"]) for r in ResultsStore(path).rows]
    assert len(keys) == len(set(keys)) == 18


def test_confidence_interval_uses_ddof_zero():
    mean, ci = mean_ci([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and ci == pytest.approx(1.96 * 0.163299 / 3**0.5, rel=1e-5)


def test_routing_is_described_once_per_episode_whatever_the_adapters(data, tmp_path, monkeypatch):
    """SMAT's routing weights (a θ_pre pass over the support) depend on the episode, not on the adapter."""
    method = smat()
    described, describe = [], method.describe_task
    monkeypatch.setattr(method, "describe_task", lambda *args: described.append(1) or describe(*args))
    store = ResultsStore(tmp_path / "episodes.jsonl")
    evaluate(method, data, ["protonet", "gradient_free"], store, RUN_INFO, num_episodes=2, progress=False,
             lr_grid=(0.0,), search_episodes=1)
    assert len(store.rows) == 2 * 6 * 2 and len(described) == 6 * 2
    by_episode = {}
    for row in store.rows:
        by_episode.setdefault((row["source"], row["episode"]), []).append(row["routing_weights"])
    assert all(weights[0] == weights[1] and len(weights) == 2 for weights in by_episode.values())
