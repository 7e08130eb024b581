"""The math of the methods, each against an independent computation."""

import math

import gin
import pytest
import torch
import torch.nn.functional as F

from methods import MINI_BACKBONE, Task, create_backbone, create_method
from methods.base import cosine_logits, forward_features, prototypes
from methods.experts import BETA, GAMMA, ZETA, ExpertDeltas, HardConcreteMasks
from methods.router import gumbel_sigmoid_weights
from methods.smat import distillation_loss


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone(MINI_BACKBONE, pretrained=False)


def random_task(ways=5, shots=3, queries=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 3, size, size, generator=g)  # noqa: E731
    return Task(x(ways * shots), torch.arange(ways).repeat(shots), x(ways * queries), torch.arange(ways).repeat(queries), ways)


def test_expected_l0_of_hard_concrete_matches_monte_carlo():
    torch.manual_seed(1)
    masks = HardConcreteMasks(2000, num_experts=3, init_std=2.0)
    with torch.no_grad():
        analytic = masks.expected_density()
        draws = torch.stack([(masks.sample(training=True) > 0).float().mean(0) for _ in range(400)])
    assert torch.allclose(draws.mean(0), analytic, atol=4 * draws.std(0).max() / math.sqrt(400) + 1e-3)


def test_hard_concrete_formula_against_the_stretched_cdf():
    """P(z > 0) = 1 − Q(0), with Q the CDF of the stretched binary concrete (Louizos et al. 2018, Eq. 12)."""
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    masks = HardConcreteMasks(4, num_experts=1)
    with torch.no_grad():
        masks.log_alpha.copy_(log_alpha[:, None])
        q0 = torch.sigmoid(BETA * (math.log(-GAMMA) - math.log(ZETA)) - log_alpha)  # Q(s <= 0)
        assert torch.allclose(masks.expected_density(), (1 - q0).mean().reshape(1), atol=1e-6)


def test_l0_sparsity_counts_the_zero_evaluation_gates_from_log_alpha_alone():
    """log α ≤ −ln 11 ⇔ the evaluation gate is exactly 0, also at the float32 neighbours of the threshold."""
    torch.manual_seed(3)
    boundary = torch.tensor(-math.log(11.0))
    below, above = boundary.clone(), boundary.clone()
    neighbours = [boundary]
    for _ in range(50):
        below, above = torch.nextafter(below, torch.tensor(-1e3)), torch.nextafter(above, torch.tensor(1e3))
        neighbours += [below, above]
    masks = HardConcreteMasks(3000 + len(neighbours), num_experts=3)
    with torch.no_grad():
        masks.log_alpha.copy_(torch.cat([torch.randn(3000, 3) * 4, torch.stack(neighbours)[:, None].expand(-1, 3)]))
        zero = (masks.sample(training=False) == 0).float().mean(0)
    assert torch.equal(masks.l0_sparsity(), zero) and 0.2 < float(zero.min()) < float(zero.max()) < 0.5


def test_gumbel_sigmoid_weights_are_normalised_in_zero_one():
    torch.manual_seed(0)
    logits = torch.randn(8) * 3
    for training in (True, False):
        alpha = gumbel_sigmoid_weights(logits, 0.5, training)
        assert torch.all(alpha > 0) and torch.all(alpha < 1)
        assert torch.isclose(alpha.sum(), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(gumbel_sigmoid_weights(logits, 2.0, False), torch.sigmoid(logits / 2) / torch.sigmoid(logits / 2).sum())


def test_eq1_equals_eq7_sparse_interpolation_form(backbone):
    """θ_pre + δ ⊙ Σ α_m z_m = Σ α_m ((1 − z_m) ⊙ θ_pre + z_m ⊙ (θ_pre + δ)) when Σ α = 1."""
    torch.manual_seed(2)
    deltas = ExpertDeltas(backbone, ["blocks.0.mlp.fc1.weight"], num_experts=4, shared=True)
    with torch.no_grad():
        deltas.delta.normal_()
    theta_pre = dict(backbone.named_parameters())["blocks.0.mlp.fc1.weight"].detach()
    z = torch.rand(*theta_pre.shape, 4).round()
    alpha = torch.softmax(torch.randn(4), 0)
    merged = deltas.merge({"blocks.0.mlp.fc1.weight": theta_pre}, alpha, z.reshape(-1, 4))["blocks.0.mlp.fc1.weight"]
    delta = deltas.delta.detach().view_as(theta_pre)
    eq7 = sum(alpha[m] * ((1 - z[..., m]) * theta_pre + z[..., m] * (theta_pre + delta)) for m in range(4))
    assert torch.allclose(merged, eq7, atol=1e-6)


def test_softmerge_is_the_weighted_average_of_expert_models(backbone):
    method = create_method("softmerge", backbone=backbone, num_experts=3)
    with torch.no_grad():
        method.deltas.delta.normal_()
    alpha = torch.tensor([0.2, 0.5, 0.3])
    merged = method.deltas.merge(method.pretrained_params(), alpha)
    for name, delta in method.deltas.tensors().items():
        experts = [method.pretrained_params()[name] + delta[..., m] for m in range(3)]
        assert torch.allclose(merged[name], sum(a * e for a, e in zip(alpha, experts)), atol=1e-5)


@pytest.mark.parametrize("dropout", [0.5, 1.0])
def test_softmerge_expert_dropout_renormalises_and_never_drops_every_expert(backbone, dropout):
    method = create_method("softmerge", backbone=backbone, num_experts=4, expert_dropout=dropout).train()
    task = random_task()
    torch.manual_seed(0)
    alpha = method.routing_weights(task.support_x, task.support_y, task.ways)
    method.eval()
    plain = method.routing_weights(task.support_x, task.support_y, task.ways)
    torch.manual_seed(0)
    kept = torch.rand(4) >= dropout  # the draw routing_weights made
    assert kept.any() == (dropout < 1)  # 0.5 keeps some experts of this draw, 1.0 drops them all
    if not kept.any():
        kept[plain.argmax()] = True
    assert 0 < kept.sum() < 4
    assert torch.allclose(alpha, torch.where(kept, plain, 0.0) / plain[kept].sum(), atol=1e-6)


def test_distillation_is_hinton_kl_teacher_to_student():
    torch.manual_seed(3)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    p_t, p_s = torch.softmax(teacher / 2, -1), torch.softmax(student / 2, -1)
    expected = 4 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert torch.isclose(distillation_loss(student, teacher, 2.0), expected, atol=1e-6)


def test_dense_teacher_sends_no_gradient_into_the_student(backbone):
    smat = create_method("smat", backbone=backbone, num_experts=2)
    task = random_task()
    _, alpha = smat.routing(task.support_x, task.support_y, task.ways)
    params = smat.merged_params(alpha, training=True)
    head = torch.randn(task.ways, backbone.num_features, requires_grad=True)
    teacher = smat._teacher_logits(params, head, task.query_x, task.query_y)
    assert not teacher.requires_grad
    kd = distillation_loss(torch.zeros_like(teacher, requires_grad=True), teacher, 2.0)
    assert torch.autograd.grad(kd, [smat.deltas.delta], allow_unused=True) == (None,)


def test_teacher_takes_k_sgd_steps_on_the_query_loss(backbone):
    smat = create_method("smat", backbone=backbone, num_experts=2, teacher_steps=3, teacher_lr=1e-4)
    task = random_task(seed=4)
    params = {n: p.detach() for n, p in backbone.named_parameters()}
    head = torch.randn(task.ways, backbone.num_features)
    before = torch.nn.functional.cross_entropy(
        smat._teacher_logits(params, head, task.query_x, task.query_y), task.query_y)
    smat.teacher_steps = 0
    untouched = torch.nn.functional.cross_entropy(
        smat._teacher_logits(params, head, task.query_x, task.query_y), task.query_y)
    assert before < untouched


@pytest.mark.parametrize("steps", [1, 2])
def test_teacher_through_the_students_query_pass_equals_a_teacher_with_its_own(backbone, steps):
    smat = create_method("smat", backbone=backbone, num_experts=2, teacher_steps=steps, teacher_lr=0.5)
    task = random_task(seed=5)
    with torch.no_grad():
        smat.deltas.delta.normal_(0, 0.02)
    _, alpha = smat.routing(task.support_x, task.support_y, task.ways)
    params = smat.merged_params(alpha, training=True)
    head = prototypes(forward_features(backbone, params, task.support_x), task.support_y, task.ways)
    query = forward_features(backbone, params, task.query_x)
    reused = smat._teacher_logits(params, head, task.query_x, task.query_y, query)
    own = smat._teacher_logits(params, head, task.query_x, task.query_y)
    untouched = cosine_logits(query, head).detach()
    assert (own - untouched).abs().max() > 1e-3  # the teacher's steps moved its logits
    torch.testing.assert_close(reused, own, rtol=1e-4, atol=1e-5)
    F.cross_entropy(cosine_logits(query, head), task.query_y).backward()  # the student's graph is still whole
    assert smat.deltas.delta.grad.abs().sum() > 0


@pytest.mark.parametrize("variant, reuse, support_passes, query_passes", [
    ("default", False, 2, 3), ("default", True, 2, 2), ("mlp_experts", True, 2, 3), ("no_dense_teacher", True, 2, 1)])
def test_images_a_smat_task_passes_forward(backbone, variant, reuse, support_passes, query_passes):
    """Routing (θ_pre) and the student pass the support; the student, the teacher's step and the teacher
    after its step pass the query. With ``dense_teacher.reuse_query_pass`` the step goes back through the
    student's query pass instead, unless a tensor of θ_i has no gradient there (experts on the MLPs only)."""
    smat = create_method("smat", backbone=backbone, num_experts=2, variant=variant)
    task = random_task(seed=6)
    passed = []
    hook = backbone.patch_embed.register_forward_hook(lambda module, args, out: passed.append(len(args[0])))
    with gin.unlock_config():
        gin.bind_parameter("dense_teacher.reuse_query_pass", reuse)
    try:
        smat.task_loss(task)
    finally:
        hook.remove()
        gin.clear_config()
    assert sum(passed) == support_passes * len(task.support_x) + query_passes * len(task.query_x)


@pytest.mark.parametrize("variant", ["default", "mlp_experts"])
def test_support_step_is_the_official_first_order_step_and_meta_training_runs_with_it(backbone, variant):
    """θ' = θ − lr·∂CE/∂θ with the prototypes held fixed (a fresh leaf, as the official code's head), c' =
    c − lr·∂CE/∂c; tensors without experts (mlp_experts: θ_pre) stay as they are."""
    smat = create_method("smat", backbone=backbone, variant=variant, support_step_lr=0.1, tasks_per_step=1)
    task = random_task()
    with torch.no_grad():
        smat.deltas.delta.normal_(0, 0.02)
    _, alpha = smat.routing(task.support_x, task.support_y, task.ways)
    params = smat.merged_params(alpha, training=True)
    support = forward_features(backbone, params, task.support_x)
    head = prototypes(support, task.support_y, task.ways)
    stepped, stepped_head = smat._support_step(params, support, head, task.support_y)

    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    fixed = head.detach().requires_grad_()
    loss = F.cross_entropy(cosine_logits(forward_features(backbone, leaves, task.support_x), fixed), task.support_y)
    *grads, head_grad = torch.autograd.grad(loss, [*leaves.values(), fixed])
    for (name, p), g in zip(params.items(), grads):
        expected = p - 0.1 * g if p.requires_grad else p
        torch.testing.assert_close(stepped[name], expected, msg=name)
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert len(frozen) == len(params) - len(smat.deltas.names) and bool(frozen) == (variant == "mlp_experts")
    torch.testing.assert_close(stepped_head, head - 0.1 * head_grad)
    smat.configure_training(2)
    before = smat.deltas.delta.detach().clone()
    smat.meta_train_step([task])  # the query loss goes back through the support pass after the step
    assert not torch.equal(smat.deltas.delta, before)


@pytest.mark.parametrize("measure", ["l0", "expected"])
def test_lagrange_multiplier_grows_while_violated_and_resets_once_met(backbone, measure):
    smat = create_method("smat", backbone=backbone, num_experts=2, target_sparsity=0.5, lagrangian_lr=2.0,
                         sparsity_measure=measure)
    with torch.no_grad():
        smat.masks.log_alpha[:, 1] = -20.0  # expert 1 all off: sparsity 1 >= τ
        smat.masks.log_alpha[:, 0] = 5.0
        smat.masks.log_alpha[:100, 0] = -2.0  # expert 0 all on at evaluation (σ(−2)·1.2 − 0.1 > 0): sparsity < τ
    smat.lagrange_multipliers.copy_(torch.tensor([0.3, 0.7]))
    metrics = [{"alpha_0": 0.6, "alpha_1": 0.4}, {"alpha_0": 0.2, "alpha_1": 0.8}]
    sparsity = smat.masks.l0_sparsity() if measure == "l0" else smat.masks.expected_sparsity()
    assert sparsity[0] < 0.5 <= sparsity[1]
    assert (float(sparsity[0]) == 0.0) == (measure == "l0")  # the two measures differ
    smat.before_step([], metrics)
    expected_0 = 0.3 + 2.0 * 0.4 * (0.5 - float(sparsity[0]))
    assert torch.allclose(smat.lagrange_multipliers, torch.tensor([expected_0, 0.0]), atol=1e-6)


def test_sparsity_penalty_pushes_gates_down_only_for_penalised_experts(backbone):
    smat = create_method("smat", backbone=backbone, num_experts=2, dense_teacher=False)
    smat.lagrange_multipliers.copy_(torch.tensor([1.0, 0.0]))
    smat.configure_training(10)
    smat.train()
    smat.accumulate_gradients([random_task()], total_tasks=1)
    grads = smat.masks.log_alpha.grad
    penalty_only = torch.autograd.grad(smat.masks.expected_density()[0], [smat.masks.log_alpha])[0]
    assert torch.all(penalty_only[:, 0] > 0) and torch.all(grads[:, 0] != 0)


def test_variants_switch_the_documented_components(backbone):
    mlp = create_method("smat", backbone=backbone, variant="mlp_experts")
    assert mlp.masks is None and not mlp.deltas.shared
    assert all(".mlp.fc" in n for n in mlp.deltas.names)
    assert create_method("smat", backbone=create_backbone(MINI_BACKBONE, pretrained=False), variant="no_dense_teacher").dense_teacher is False
    with pytest.raises(ValueError, match="smat.variant = 'no_such_row': give one of 'default'"):
        create_method("smat", backbone=backbone, variant="no_such_row")


def test_a_switch_bound_directly_names_the_variant_it_makes(backbone):
    """`smat.dense_teacher = False` without `smat.variant` is Table 2's row 2, not the default SMAT."""
    assert create_method("smat", backbone=backbone, dense_teacher=False).variant == "no_dense_teacher"
    assert create_method("smat", backbone=backbone, learned_sparsity=False, interpolated_experts=False).variant == (
        "mlp_experts")
    assert create_method("smat", backbone=backbone, dense_teacher=False, meta_split=False).variant == (
        "no_meta_split+no_dense_teacher")
    assert create_method("smat", backbone=backbone).variant == "default"


@pytest.mark.parametrize("name", ["smat", "softmerge"])
def test_model_starts_exactly_at_the_pretrained_backbone(backbone, name):
    method = create_method(name, backbone=backbone)
    task = random_task()
    merged = method.task_model(task.support_x, task.support_y, task.ways)
    pre = create_method("pre", backbone=backbone).task_model(task.support_x, task.support_y, task.ways)
    assert torch.allclose(merged.logits(task.query_x), pre.logits(task.query_x), atol=1e-5)


def test_gradient_free_returns_only_a_selection_it_accepted(backbone, monkeypatch):
    """Alg. 2 records l* when it accepts a candidate: with ρ = 0 no improving flip is ever accepted, so the
    hypernetwork's own selection is used, however low the support loss of a rejected flip."""
    from methods import adapters

    torch.manual_seed(0)
    smat = create_method("smat", backbone=backbone, num_experts=4).eval()
    with torch.no_grad():
        smat.deltas.delta.normal_(0, 0.05)
        smat.masks.log_alpha.normal_(0, 2.0)
        smat.router.expert_keys.normal_(0, 1.0)
    task = random_task()
    used, losses, cross_entropy = [], [], F.cross_entropy
    monkeypatch.setattr(adapters, "_predict", lambda features_of, *args: used.append(features_of.args[1]))
    monkeypatch.setattr(adapters.F, "cross_entropy", lambda *a: losses.append(float(cross_entropy(*a))) or losses[-1])
    with torch.no_grad():
        logits, _ = smat.routing(task.support_x, task.support_y, task.ways)
        initial = (torch.sigmoid(logits / smat.temperature()) > 0.5).float()
        assert 0 < initial.sum() < 4
        expected = smat.merged_params(initial / initial.sum(), training=False)
    adapters.gradient_free(smat, task, None, torch.Generator().manual_seed(0), rounds=3, accept_probability=0.0)
    assert min(losses[1:]) < losses[0]  # a rejected flip scored below the start (losses[0])
    assert all(torch.equal(used[0][name], expected[name]) for name in expected)
