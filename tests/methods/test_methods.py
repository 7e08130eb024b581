"""Every registered method honours the `Method` contract and learns on the mini benchmark."""

import math

import gin
import pytest
import torch
import torch.nn.functional as F

from benchmark.episodes import BenchmarkData
from methods import MINI_BACKBONE, Method, Task, create_backbone, create_method, list_methods, register_method
from methods.smat import VARIANTS
from registry.errors import DataError

TRAINED = [(name, None) for name in list_methods() if create_method(name, backbone=create_backbone(MINI_BACKBONE, pretrained=False)).trains]
TRAINED += [("smat", variant) for variant in VARIANTS if variant != "default"]


@pytest.fixture(scope="module")
def mini_tasks(mini_root):
    data = BenchmarkData("md_mini", mini_root)
    stream = data.train_episodes(seed=3, num_episodes=4)
    return [Task.from_episode(stream[i]) for i in range(4)]


def query_ce(method, tasks):
    """Mean query cross-entropy of the method's task models (evaluation mode, no adaptation)."""
    with torch.no_grad():
        losses = [F.cross_entropy(method.task_model(t.support_x, t.support_y, t.ways).logits(t.query_x), t.query_y)
                  for t in tasks]
    return float(sum(losses) / len(losses))


def test_the_four_paper_methods_are_registered():
    assert {"pre", "pmf", "softmerge", "smat"} <= set(list_methods())
    assert list_methods("s*") == ["smat", "softmerge"]


def test_registering_a_taken_name_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_method("smat")(type("Impostor", (Method,), {}))


def test_unknown_method_lists_close_matches():
    with pytest.raises(DataError, match="unknown method 'smta'; did you mean 'smat'"):
        create_method("smta", backbone=None)


@pytest.mark.parametrize("name, variant", TRAINED, ids=[f"{n}-{v or 'default'}" for n, v in TRAINED])
def test_short_meta_training_lowers_the_query_loss(mini_tasks, name, variant):
    torch.manual_seed(0)
    kwargs = dict(variant=variant) if variant else {}
    lr = {"pmf": dict(lr=0.05), "softmerge": dict(delta_lr=0.3), "smat": dict(delta_lr=0.3)}[name]
    method = create_method(name, backbone=create_backbone(MINI_BACKBONE, pretrained=False), **kwargs, **lr,
                           warmup_fraction=0.0, tasks_per_step=len(mini_tasks))
    method.configure_training(12)
    before = query_ce(method, mini_tasks)
    for _ in range(12):
        metrics = method.meta_train_step(mini_tasks)
    after = query_ce(method, mini_tasks)
    assert after < before - 0.05, (before, after)
    assert {"loss", "query_acc"} <= set(metrics)


def test_pre_does_not_train_and_predicts_with_the_pretrained_weights(mini_tasks):
    backbone = create_backbone(MINI_BACKBONE, pretrained=False)
    pre = create_method("pre", backbone=backbone)
    task = mini_tasks[0]
    model = pre.task_model(task.support_x, task.support_y, task.ways)
    assert not pre.trains and not any(p.requires_grad for p in pre.parameters())
    assert all(model.params[n] is p for n, p in backbone.named_parameters())
    assert model.predict(task.query_x).shape == task.query_y.shape


def test_smat_learns_its_masks_and_they_reach_the_target_sparsity_on_the_mini_benchmark(mini_root):
    """With the mini setup's learning rates, the Lagrangian drives the sparsity of every expert's evaluation
    mask to τ (within 0.025), and the task loss decides which gates stay open: the gates end near 0 or 1,
    and which ones are open is not the order of the initial log α (the penalty alone lowers every log α
    alike, so it would keep that order and leave the evaluation masks near all-zero)."""
    from benchmark.run import parse_config

    parse_config(["methods/smat.gin"], [])  # the mini setup: smat.delta_lr, smat.lagrangian_lr
    try:
        torch.manual_seed(0)
        smat = create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), tasks_per_step=2)
    finally:
        gin.clear_config()
    initial = smat.masks.log_alpha.detach().clone()
    steps = 100
    smat.configure_training(steps)
    stream = BenchmarkData("md_mini", mini_root).train_episodes(seed=0, num_episodes=2 * steps)
    for i in range(steps):
        metrics = smat.meta_train_step([Task.from_episode(stream[2 * i]), Task.from_episode(stream[2 * i + 1])])
    sparsity = smat.masks.l0_sparsity()
    assert torch.all((sparsity - smat.target_sparsity).abs() <= 0.025), sparsity
    gates = smat.masks.sample(training=False)
    decided = float(((gates == 0) | (gates == 1)).float().mean())
    log_alpha = smat.masks.log_alpha.detach()
    correlation = float(torch.corrcoef(torch.stack([log_alpha.flatten(), initial.flatten()]))[0, 1])
    assert decided > 0.9 and correlation < 0.5, (decided, correlation)
    assert float(log_alpha.abs().max()) <= math.log(100) + 1e-6  # clamped as the official code clamps
    assert all(f"sparsity_{m}" in metrics and f"lambda_{m}" in metrics and f"alpha_{m}" in metrics for m in range(8))


def test_checkpoint_state_restores_every_tensor_and_optimizer(mini_tasks):
    torch.manual_seed(0)
    first = create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), tasks_per_step=2)
    first.configure_training(5)
    for _ in range(2):
        first.meta_train_step(mini_tasks[:2])
    state, training = first.state_dict(), first.training_state()
    torch.manual_seed(1)
    second = create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), tasks_per_step=2)
    second.configure_training(5)
    second.load_state_dict(state)
    second.load_training_state(training)
    assert int(second.steps) == 2 and torch.equal(second.lagrange_multipliers, first.lagrange_multipliers)
    assert torch.equal(second.router.expert_keys, first.router.expert_keys)
    torch.manual_seed(7)
    a = first.meta_train_step(mini_tasks[2:])
    torch.manual_seed(7)
    b = second.meta_train_step(mini_tasks[2:])
    assert a == b


def test_smat_reports_its_experts_and_describes_each_task(mini_tasks):
    smat = create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), num_experts=3)
    report = smat.report()
    assert len(report["expected_sparsity"]) == len(report["l0_sparsity"]) == 3
    overlap = torch.tensor(report["overlap"])
    assert torch.allclose(overlap, overlap.t()) and torch.allclose(overlap.diagonal(), torch.ones(3))
    assert set(report["tensors"]) == set(n for n, _ in smat.backbone.named_parameters())
    task = mini_tasks[0]
    weights = smat.describe_task(task.support_x, task.support_y, task.ways)["routing_weights"]
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5
    assert create_method("pre", backbone=create_backbone(MINI_BACKBONE, pretrained=False)).describe_task(
        task.support_x, task.support_y, task.ways) == {}


def test_a_task_copy_owns_the_learned_tensors_shares_the_backbone_and_leaves_training_state_behind(mini_tasks):
    """`full_joint` fine-tunes a task copy: nothing of meta-training (optimizer state, cached N × M
    evaluation gates) is copied with it, and fine-tuning the copy leaves the method as it was."""
    smat = create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), num_experts=2,
                         tasks_per_step=2)
    smat.configure_training(4)
    smat.meta_train_step(mini_tasks[:2])
    smat.eval()
    smat.evaluation_gates()
    assert smat.optimizers and smat.optimizers[0].state and smat._evaluation_gates is not None
    copied = smat.task_copy()
    assert copied.backbone is smat.backbone
    assert copied.optimizers is None and copied.schedulers is None and copied._evaluation_gates is None
    assert copied.deltas.delta.data_ptr() != smat.deltas.delta.data_ptr()
    torch.testing.assert_close(copied.deltas.delta, smat.deltas.delta)
    before = smat.deltas.delta.detach().clone()
    with torch.no_grad():
        copied.deltas.delta.add_(1.0)
    assert torch.equal(smat.deltas.delta, before) and smat.optimizers[0].state
    torch.testing.assert_close(copied.evaluation_gates(), smat.evaluation_gates())  # recomputed from its own log α


def test_end_training_frees_gradients_and_optimizer_state(mini_tasks):
    """Meta-testing after training in the same process holds no more memory than after loading a checkpoint."""
    smat = create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), num_experts=2,
                         tasks_per_step=2)
    smat.configure_training(4)
    smat.meta_train_step(mini_tasks[:2])
    assert smat.masks.log_alpha.grad is not None and smat.optimizers[0].state
    smat.end_training()
    assert all(p.grad is None for p in smat.parameters()) and smat.optimizers == [] and smat.schedulers == []
    with pytest.raises(RuntimeError, match="configure_training"):
        smat.meta_train_step(mini_tasks[:2])
