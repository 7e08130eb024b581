"""The fast paths give the plain paths' predictions: each is checked against a straightforward reference.

The references are the textbook forms — a Python loop over the backbone's tensors for the merge and
the hard-concrete gates (paper Eq. 1), separate support and query forward passes, a deep copy of the
backbone wrapped by peft for LoRA. On CPU (fp32) predictions must be identical. Set
``SMAT_BENCH_TEST_DEVICE=cuda`` to run the same checks on a GPU under bf16 autocast, where a few
near-tie queries may flip (at most `BF16_FLIPS` of them).
"""

import contextlib
import copy
import os
import warnings

import gin
import pytest
import torch
import torch.nn.functional as F

from benchmark.perf import kept_activations_mib
from methods import MINI_BACKBONE, Task, create_backbone, create_method
from methods.adapters import _support_loss, get_adapter, seeded_generator, split_qkv
from methods.backbones import _DERIVED, compiles
from methods.base import autocast, cosine_logits, forward_features, inference_features, prototypes
from methods.experts import BETA, GAMMA, ZETA
import methods.smat
from methods.smat import distillation_loss

DEVICE = torch.device(os.environ.get("SMAT_BENCH_TEST_DEVICE", "cpu"))
BF16_FLIPS = 0.02  # share of queries allowed to change prediction under bf16 autocast
# Fine-tuning under bf16 for 50 steps on a random tiny network lets rounding differences grow into other
# predictions; on a GPU the fine-tuning checks take fewer steps and more queries (1 flip = 1%).
FINETUNE_STEPS, FINETUNE_QUERIES = (50, 3) if DEVICE.type == "cpu" else (10, 20)


def random_task(ways=5, shots=4, queries=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 3, size, size, generator=g).to(DEVICE)  # noqa: E731
    y = lambda n: torch.arange(ways).repeat(n).to(DEVICE)  # noqa: E731
    return Task(x(ways * shots), y(shots), x(ways * queries), y(queries), ways)


def trained_like(name, **kwargs):
    """A method whose experts (if any) are not at their zero initialisation (so merges are not trivially θ_pre)."""
    torch.manual_seed(0)
    method = create_method(name, backbone=create_backbone(MINI_BACKBONE, pretrained=False), **kwargs).to(DEVICE)
    if getattr(method, "deltas", None) is None:
        return method
    with torch.no_grad():
        method.deltas.delta.normal_(0, 0.02)
        if getattr(method, "masks", None) is not None:
            method.masks.log_alpha.normal_(0, 2.0)
    return method


def assert_same_predictions(fast, plain):
    flips = float((fast != plain).float().mean())
    assert flips <= (BF16_FLIPS if DEVICE.type == "cuda" else 0.0), f"{flips:.1%} of the predictions differ"


@pytest.fixture
def full_precision(monkeypatch):
    """fp32 everywhere, also on a GPU (no autocast, no TF32), so gradients can be compared elementwise:
    bf16 rounds the two computations differently, which the prediction checks bound instead."""
    import methods.base

    monkeypatch.setattr(methods.base, "autocast", lambda device: contextlib.nullcontext())
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- references ----------------------------------------------------------------------------------


def reference_gates(log_alpha, u=None):
    """Hard-concrete gates of one tensor's log α (``shape × M``), training noise ``u`` or evaluation."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA) if u is not None else torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def reference_merge(method, alpha, training, u=None):
    """θ_i by a loop over the tensors with experts (paper Eq. 1; separate experts for SoftMerge / variants)."""
    deltas, masks = method.deltas, getattr(method, "masks", None)
    params = dict(method.backbone.named_parameters())
    log_alphas = deltas.layout.split(masks.log_alpha) if masks is not None else [None] * len(deltas.names)
    noise = deltas.layout.split(u) if u is not None else [None] * len(deltas.names)
    for (name, delta), log_alpha, u_p in zip(deltas.tensors().items(), log_alphas, noise):
        z = reference_gates(log_alpha, u_p if training else None) if log_alpha is not None else None
        if deltas.shared:
            update = delta * ((z * alpha).sum(-1) if z is not None else alpha.sum())
        else:
            update = ((delta * z if z is not None else delta) * alpha).sum(-1)
        params[name] = params[name] + update
    return params


def features_apart(features_of, task):
    """Support and query features from two separate forward passes."""
    return features_of(task.support_x), features_of(task.query_x)


def reference_finetune(features_of, parameters, task, lr, generator, steps=50):
    """Predictions after the plain fine-tuning loop (Adam, a new step each time), predicted by two passes."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        _support_loss(features_of, task, generator, 10.0, 0.0).backward()
        optimizer.step()
    with torch.no_grad():
        support, query = features_apart(features_of, task)
        return cosine_logits(query, prototypes(support, task.support_y, task.ways)).argmax(-1)


# --- checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, variant", [("smat", "default"), ("smat", "no_interpolated_experts"),
                                           ("smat", "mlp_experts"), ("softmerge", None)])
def test_flat_merge_equals_the_per_tensor_merge_with_gradients(name, variant):
    method = trained_like(name, **({"variant": variant} if variant else {}))
    alpha = torch.softmax(torch.randn(method.deltas.num_experts, device=DEVICE), 0).requires_grad_()
    masks = getattr(method, "masks", None)
    torch.manual_seed(1)
    fast = method.merged_params(alpha, training=True) if name == "smat" else method.deltas.merge(method.pretrained_params(), alpha)
    torch.manual_seed(1)
    u = torch.rand_like(masks.log_alpha).clamp(1e-6, 1 - 1e-6) if masks is not None else None
    plain = reference_merge(method, alpha, training=True, u=u)
    weights = {n: torch.randn_like(p) for n, p in plain.items()}
    leaves = [alpha, method.deltas.delta] + ([masks.log_alpha] if masks is not None else [])
    grads = [torch.autograd.grad(sum((w * params[n]).sum() for n, w in weights.items()), leaves) for params in (fast, plain)]
    for n in plain:
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-5, atol=1e-6)
    for g_fast, g_plain in zip(*grads):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["pre", "pmf", "softmerge", "smat"])
def test_protonet_in_one_forward_pass_equals_two_passes(name):
    method = trained_like(name) if name in ("softmerge", "smat") else create_method(
        name, backbone=create_backbone(MINI_BACKBONE, pretrained=False)).to(DEVICE)
    task = random_task()
    model = method.task_model(task.support_x, task.support_y, task.ways)
    fast = model.logits(task.query_x)  # first call: support and query in one batch
    support, query = features_apart(model.features, task)
    plain = cosine_logits(query, prototypes(support, task.support_y, task.ways), model.scale, model.bias)
    assert_same_predictions(fast.argmax(-1), plain.argmax(-1))
    if DEVICE.type == "cpu":
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_predictions_equal_the_plain_loop():
    method = trained_like("smat")
    task = random_task(queries=FINETUNE_QUERIES, seed=3)
    fast = get_adapter("full")(method, task, 1e-3, seeded_generator("episode"), steps=FINETUNE_STEPS)
    model = method.task_model(task.support_x, task.support_y, task.ways)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.params.items()}

    def features_of(x):
        with autocast(DEVICE):
            return forward_features(method.backbone, params, x)

    assert_same_predictions(fast, reference_finetune(features_of, list(params.values()), task, 1e-3,
                                                     seeded_generator("episode"), FINETUNE_STEPS))


def test_lora_without_model_copies_equals_a_peft_wrapped_deep_copy():
    from peft import LoraConfig, inject_adapter_in_model

    method = trained_like("smat")
    task = random_task(queries=FINETUNE_QUERIES, seed=4)
    fast = get_adapter("lora")(method, task, 1e-2, seeded_generator("episode"), steps=FINETUNE_STEPS)
    model = method.task_model(task.support_x, task.support_y, task.ways)
    backbone = copy.deepcopy(method.backbone)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            p.copy_(model.params[name])
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, bias="none", target_modules=r".*attn\.qkv\.(q|v)")
    backbone = inject_adapter_in_model(config, split_qkv(backbone).requires_grad_(False)).eval()
    generator = seeded_generator("episode")
    lora = [p for n, p in backbone.named_parameters() if "lora_" in n]
    with torch.no_grad():  # A ~ U(±1/√fan_in) from the episode's generator in parameter order, B = 0
        for n, p in backbone.named_parameters():
            if "lora_A" in n:
                bound = 1.0 / p.shape[1] ** 0.5
                p.copy_(torch.zeros(p.shape).uniform_(-bound, bound, generator=generator))
            elif "lora_B" in n:
                p.zero_()
    for p in lora:
        p.requires_grad_(True)

    def features_of(x):
        with autocast(DEVICE):
            return backbone(x).float()

    assert_same_predictions(fast, reference_finetune(features_of, lora, task, 1e-2, generator, FINETUNE_STEPS))


@pytest.mark.parametrize("variant, reuse", [("default", False), ("default", True), ("no_meta_split", True),
                                            ("no_interpolated_experts", False), ("mlp_experts", True)])
def test_smat_step_gradients_equal_one_plain_graph_per_task(variant, reuse, full_precision, monkeypatch):
    """The deferred expert gradient, the once-per-step penalty and (``reuse``) the teacher's step through
    the student's query pass against one plain graph per task (per-tensor merge, separate support and
    query passes, a teacher with passes of its own), in fp32 on every device."""
    monkeypatch.setattr(methods.smat, "teacher_reuses_query_pass", lambda: reuse)
    method = trained_like("smat", variant=variant)
    method.configure_training(10)
    method.train()
    method.lagrange_multipliers.copy_(torch.linspace(0.1, 0.8, len(method.lagrange_multipliers)))
    tasks = [random_task(seed=5), random_task(ways=3, seed=6)]
    leaves = [method.deltas.delta, *method.router.parameters()]
    if method.masks is not None:
        leaves.append(method.masks.log_alpha)
    torch.manual_seed(7)
    method.accumulate_gradients(tasks, total_tasks=len(tasks))
    fast_grads = [p.grad.clone() for p in leaves]

    torch.manual_seed(7)  # the same noise, drawn in the same order: the step's gates, then each task's routing
    u = torch.rand_like(method.masks.log_alpha).clamp(1e-6, 1 - 1e-6) if method.masks is not None else None
    plain_total = 0
    for task in tasks:
        support_x, support_y, query_x, query_y = task.support_x, task.support_y, task.query_x, task.query_y
        if variant == "no_meta_split":
            support_x = query_x = torch.cat([support_x, query_x])
            support_y = query_y = torch.cat([support_y, query_y])
        logits, alpha = method.routing(support_x, support_y, task.ways)
        params = reference_merge(method, alpha, training=True, u=u)
        head = prototypes(forward_features(method.backbone, params, support_x), support_y, task.ways)
        student = cosine_logits(forward_features(method.backbone, params, query_x), head)
        teacher = method._teacher_logits(params, head, query_x, query_y)
        loss = 0.75 * F.cross_entropy(student, query_y) + 0.25 * distillation_loss(student, teacher, 2.0)
        loss = loss + 1e-4 * logits.pow(2).mean()
        if method.masks is not None:
            slack = method.masks.expected_density() - 0.1
            loss = loss + (method.lagrange_multipliers * alpha.detach() * slack).sum()
        plain_total = plain_total + loss / len(tasks)
    plain_grads = torch.autograd.grad(plain_total, leaves)
    for g_fast, g_plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-3, atol=1e-5)


def test_compiled_training_gates_equal_the_eager_ones_and_keep_only_their_noise():
    from methods.experts import HardConcreteMasks, hard_concrete

    masks = HardConcreteMasks(numel=4000, num_experts=8, init_std=2.0).to(DEVICE)
    weights = torch.randn(4000, 8, device=DEVICE)
    gates, grads, kept = {}, {}, {}
    for compiled in (False, True):
        torch.manual_seed(2)
        gates[compiled] = hard_concrete(masks.log_alpha, training=True, compile_gates=compiled)
        grads[compiled], = torch.autograd.grad((gates[compiled] * weights).sum(), masks.log_alpha)
        kept[compiled] = kept_activations_mib(lambda _: hard_concrete(masks.log_alpha, True, compile_gates=compiled),
                                              masks, weights)
    z = gates[False]
    assert ((z == 0) | (z == 1)).any() and ((z > 0) & (z < 1)).any()  # clamped and interior gates both checked
    torch.testing.assert_close(gates[True], z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)
    noise_mib = z.numel() * 4 / 2**20
    assert kept[True] <= 1.01 * noise_mib and kept[False] >= 1.99 * noise_mib, kept  # u alone; eager: s and its stretch


def test_evaluation_gates_are_kept_until_log_alpha_changes():
    method = trained_like("smat")
    alpha = torch.softmax(torch.randn(method.deltas.num_experts, device=DEVICE), 0)
    with torch.no_grad():
        first = method.evaluation_gates()
        assert method.evaluation_gates() is first  # kept
        assert torch.equal(first, method.masks.sample(training=False))
        merged, plain = method.merged_params(alpha, training=False), reference_merge(method, alpha, training=False)
        for n in plain:
            torch.testing.assert_close(merged[n], plain[n], rtol=1e-5, atol=1e-6)
        method.masks.log_alpha.add_(-1.0)  # as an optimizer step would
        assert not torch.equal(method.evaluation_gates(), first)
        assert torch.equal(method.evaluation_gates(), method.masks.sample(training=False))
    method.configure_training(1)
    method.train()
    method.accumulate_gradients([random_task()], total_tasks=1)
    assert method._evaluation_gates is None  # a training step makes them stale: they are not held meanwhile


def test_batched_translation_equals_the_per_image_loop():
    from methods.adapters import translate

    x = torch.randn(9, 3, 16, 12, device=DEVICE)
    fast = translate(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(-2, 3, (9,), generator=g).tolist()  # round(0.125 · 16) = 2, round(0.125 · 12) = 2
    dx = torch.randint(-2, 3, (9,), generator=g).tolist()
    padded = F.pad(x, (2, 2, 2, 2))
    plain = torch.stack([padded[i, :, 2 - dy[i]: 2 - dy[i] + 16, 2 - dx[i]: 2 - dx[i] + 12] for i in range(9)])
    assert torch.equal(fast, plain)


def test_step_metrics_are_read_in_one_copy_with_their_names_and_order():
    from methods.base import read_metrics

    metrics = [{"loss": torch.tensor(0.5, device=DEVICE), "ways": 5, "acc": torch.tensor(0.25, device=DEVICE)},
               {"loss": torch.tensor(1.5, device=DEVICE, dtype=torch.bfloat16), "ways": 3, "acc": 0.75}]
    assert read_metrics(metrics) == [{"loss": 0.5, "ways": 5, "acc": 0.25}, {"loss": 1.5, "ways": 3, "acc": 0.75}]
    assert read_metrics([{"ways": 5}]) == [{"ways": 5}]


def host_waits(fn):
    """How many times ``fn()`` makes the host wait for the GPU (CUDA's synchronisation debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-device synchronisation exists only with a CUDA device")
@pytest.mark.parametrize("name", ["pmf", "softmerge", "smat"])
def test_a_meta_training_step_waits_for_the_gpu_as_often_whatever_its_number_of_tasks(name):
    method = trained_like(name)
    method.configure_training(10)
    tasks = [random_task(seed=s) for s in range(4)]
    method.meta_train_step(tasks[:2])  # compiles the routing pass, outside the count
    waits = {n: host_waits(lambda: method.meta_train_step(tasks[:n])) for n in (2, 4)}
    assert waits[2] == waits[4] >= 1, waits  # the metrics are read once per step, not per task or per value


def reference_augment(x, generator, shift=2):
    """PMF's DiffAugment image by image from the same draws (coin, flip, brightness, saturation, contrast, dy, dx)."""
    if torch.rand((), generator=generator) >= 0.9:
        return x
    flip = bool(torch.rand((), generator=generator) < 0.5)
    brightness, saturation, contrast = (torch.rand(len(x), generator=generator).tolist() for _ in range(3))
    dy, dx = (torch.randint(-shift, shift + 1, (len(x),), generator=generator).tolist() for _ in range(2))
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i, image in enumerate(x):
        image = image.flip(-1) if flip else image
        image = image + (brightness[i] - 0.5)
        mean = image.mean(0, keepdim=True)
        image = (image - mean) * (2 * saturation[i]) + mean
        image = (image - image.mean()) * (contrast[i] + 0.5) + image.mean()
        rows, cols = slice(max(dy[i], 0), h + min(dy[i], 0)), slice(max(dx[i], 0), w + min(dx[i], 0))
        out[i, :, rows, cols] = image[:, max(-dy[i], 0):h - max(dy[i], 0), max(-dx[i], 0):w - max(dx[i], 0)]
    return out


def test_batched_augmentation_equals_pmfs_diffaugment_image_by_image():
    from methods.adapters import augment_support

    x = torch.randn(6, 3, 16, 16, device=DEVICE)
    outcomes = set()
    for seed in range(40):
        fast = augment_support(x, torch.Generator().manual_seed(seed))
        plain = reference_augment(x, torch.Generator().manual_seed(seed))
        outcomes.add(fast is x)
        assert (fast is x) == (plain is x)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert outcomes == {True, False}  # both a step without and steps with augmentation were checked


def test_a_step_without_augmentation_passes_the_support_once_with_the_two_pass_loss():
    torch.manual_seed(0)
    backbone = create_backbone(MINI_BACKBONE, pretrained=False).to(DEVICE)
    task = random_task(seed=4)
    seed = next(s for s in range(100) if torch.rand((), generator=torch.Generator().manual_seed(s)) >= 0.9)
    batches = []

    def features_of(x):
        batches.append(len(x))
        return backbone(x).float()

    once = _support_loss(features_of, task, torch.Generator().manual_seed(seed), 10.0, 0.0)
    assert batches == [len(task.support_x)]
    features = features_of(torch.cat([task.support_x, task.support_x]))
    n = len(task.support_x)
    twice = F.cross_entropy(cosine_logits(features[n:], prototypes(features[:n], task.support_y, task.ways)), task.support_y)
    leaves = list(backbone.parameters())
    torch.testing.assert_close(once, twice)
    for g_once, g_twice in zip(torch.autograd.grad(once, leaves), torch.autograd.grad(twice, leaves)):
        torch.testing.assert_close(g_once, g_twice, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-device synchronisation exists only with a CUDA device")
def test_a_fine_tuning_step_never_waits_for_the_gpu():
    torch.manual_seed(0)
    backbone = create_backbone(MINI_BACKBONE, pretrained=False).to(DEVICE)
    task = random_task(seed=5)

    def features_of(x):
        with autocast(DEVICE):
            return backbone(x).float()

    def steps():  # with and without augmentation
        for seed in range(12):
            _support_loss(features_of, task, torch.Generator().manual_seed(seed), 10.0, 0.0).backward()

    assert host_waits(lambda: float(task.support_x.sum())) == 1  # the count sees a wait
    assert host_waits(steps) == 0


def test_full_fine_tuning_carries_nothing_between_tasks_and_checkpointing_changes_no_prediction():
    from methods.adapters import full

    method = trained_like("smat")
    first, second = random_task(seed=6), random_task(seed=7)
    alone = full(method, second, 1e-3, seeded_generator("b"), steps=5)
    full(method, first, 1e-2, seeded_generator("a"), steps=5)  # the working copy now holds another task's weights
    again = full(method, second, 1e-3, seeded_generator("b"), steps=5)
    if DEVICE.type == "cpu":
        assert torch.equal(again, alone)
    else:  # GPU attention backward kernels need not be bitwise deterministic
        assert_same_predictions(again, alone)
    checkpointed = full(method, second, 1e-3, seeded_generator("b"), steps=5, grad_checkpointing=True)
    work, _ = _DERIVED[method.backbone][("working copy", "full", str(DEVICE), None)]
    assert work.grad_checkpointing  # the working copy did checkpoint
    assert_same_predictions(checkpointed, alone)


@pytest.mark.parametrize("name, kwargs, bindings", [
    ("pmf", {}, {}), ("softmerge", {}, {}), ("smat", {}, {}), ("smat", {}, {"dense_teacher.reuse_query_pass": True}),
    ("smat", dict(support_step_lr=0.1), {"dense_teacher.reuse_query_pass": True})],
    ids=["pmf", "softmerge", "smat", "smat_teacher_reuse", "smat_support_step_teacher_reuse"])
def test_compiled_meta_training_steps_equal_the_eager_ones(name, kwargs, bindings, full_precision):
    """(The teacher's step through the student's query pass and SMAT's support step go back through a
    compiled pass twice.)"""
    tasks = [random_task(size=16, seed=s) for s in range(2)]  # not the backbone's 32 px: position embeddings resampled
    trained = {}
    for compiled in (False, True):
        method = trained_like(name, **kwargs)
        method.configure_training(10)
        with gin.unlock_config():
            for key, value in {"differentiable.compile_backbone": compiled, **bindings}.items():
                gin.bind_parameter(key, value)
        try:
            torch.manual_seed(5)  # the same gate and routing noise
            for _ in range(2):
                method.meta_train_step(tasks)
        finally:
            gin.clear_config()
        trained[compiled] = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    assert ("compiled functional",) in _DERIVED[method.backbone]  # the compiled path was taken
    for n, eager in trained[False].items():
        atol = 1e-3 if n == "masks.log_alpha" else 1e-5  # its lr 1e6 turns float rounding into ~1e-4 per step
        torch.testing.assert_close(trained[True][n], eager, rtol=1e-4, atol=atol, msg=n)


@pytest.mark.parametrize("adapter", ["lora", "full_joint"])
def test_adapters_with_compiled_differentiable_passes_equal_the_eager_ones(adapter, monkeypatch):
    import methods.base

    compiled_for, compiled_functional = [], methods.base.compiled_functional
    monkeypatch.setattr(methods.base, "compiled_functional", lambda b: compiled_for.append(b) or compiled_functional(b))
    method = trained_like("smat")
    task = random_task(queries=FINETUNE_QUERIES, seed=9)
    predictions = {}
    for compiled in (False, True):
        with gin.unlock_config():
            gin.bind_parameter("differentiable.compile_backbone", compiled)
            gin.bind_parameter(f"{adapter}.steps", 3)
        try:
            predictions[compiled] = get_adapter(adapter)(method, task, 1e-3, seeded_generator("d"))
        finally:
            gin.clear_config()
    assert compiled_for  # the compiled path was taken
    assert_same_predictions(predictions[True], predictions[False])


def test_compiled_full_fine_tuning_equals_the_eager_one():
    from methods.adapters import full

    method = trained_like("smat")
    task = random_task(queries=FINETUNE_QUERIES, size=16, seed=8)  # position embeddings resampled
    eager = full(method, task, 1e-3, seeded_generator("c"), steps=3, compile_backbone=False)
    compiled = full(method, task, 1e-3, seeded_generator("c"), steps=3, compile_backbone=True)
    assert ("working copy", "full", str(DEVICE), None) in _DERIVED[method.backbone]  # the compiled path was taken
    assert_same_predictions(compiled, eager)


def test_an_activation_memory_budget_keeps_fewer_activations_and_changes_no_prediction():
    from methods.adapters import full

    method = trained_like("smat")
    task = random_task(queries=FINETUNE_QUERIES, seed=8)
    unbounded = full(method, task, 1e-3, seeded_generator("c"), steps=3, compile_backbone=True)
    budgeted = full(method, task, 1e-3, seeded_generator("c"), steps=3, compile_backbone=True,
                    activation_memory_budget=0.5)
    assert_same_predictions(budgeted, unbounded)
    copies = _DERIVED[method.backbone]
    kept = {}
    for budget in (None, 0.5):
        work, compiled = copies[("working copy", "full", str(DEVICE), budget)]
        kept[budget] = kept_activations_mib(compiled, work, task.support_x)
    assert kept[0.5] < 0.8 * kept[None], kept


@pytest.mark.parametrize("choice, device, capability, expected", [
    (None, "cpu", None, False), (None, "cuda", (8, 0), True), (None, "cuda", (7, 0), True),
    (None, "cuda", (6, 0), False), (True, "cpu", None, True), (False, "cuda", (9, 0), False)])
def test_compile_switches_default_to_the_cuda_gpus_triton_supports(choice, device, capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert compiles(choice, device) is expected


def test_compiled_inference_equals_the_plain_forward():
    """`inference_features` through the compiled working copy gives the functional forward's features for
    other weights and other batch sizes (the copy keeps no stale weights, the graph no stale shapes), and
    the predictions of protonet and gradient_free."""
    method = trained_like("smat")
    backbone = method.backbone
    other = {n: p.detach() + 0.05 * torch.randn_like(p) for n, p in backbone.named_parameters()}
    tolerance = dict(rtol=1e-4, atol=1e-4) if DEVICE.type == "cpu" else dict(rtol=0.05, atol=0.05)  # bf16
    for params, n in [(method.pretrained_params(), 12), (other, 12), (other, 21), (method.pretrained_params(), 7)]:
        x = torch.randn(n, 3, 32, 32, device=DEVICE)
        torch.testing.assert_close(inference_features(backbone, params, x, compile_backbone=True),
                                   inference_features(backbone, params, x, compile_backbone=False), **tolerance)
    tasks = [random_task(seed=9), random_task(ways=3, shots=2, queries=5, seed=10)]
    predictions = {}
    for compiled in (False, True):
        gin.bind_parameter("inference.compile_backbone", compiled)
        predictions[compiled] = [get_adapter(name)(method, task, 0.0, seeded_generator("g"))
                                 for name in ("protonet", "gradient_free") for task in tasks]
    assert ("working copy", "inference", str(DEVICE), None) in _DERIVED[backbone]  # the compiled path was taken
    for fast, plain in zip(predictions[True], predictions[False], strict=True):
        assert_same_predictions(fast, plain)


def test_a_compiled_forward_with_gradients_does_not_keep_its_backbone_alive():
    """`compiled_functional` is kept per backbone (a weak key): it must not hold the backbone itself, or neither
    is ever freed (a later model's peak memory would count it)."""
    import gc
    import weakref

    backbone = create_backbone(MINI_BACKBONE, pretrained=False).to(DEVICE)
    params = {n: p.detach().clone().requires_grad_() for n, p in backbone.named_parameters()}
    forward_features(backbone, params, random_task().support_x, compile_backbone=True).sum().backward()
    assert backbone in _DERIVED
    alive = weakref.ref(backbone)
    del backbone
    gc.collect()
    assert alive() is None
