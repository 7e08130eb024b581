"""Meta-test adapters: how a method's task model is adapted to a test task before predicting its queries.

Every adapter is ``adapter(method, task, lr, generator) -> query predictions`` and starts from the
method's task model for that task, so nothing carries over between episodes:

* ``protonet``: no adaptation; cosine ProtoNet on the task model's features.
* ``full`` (paper Alg. 3, the PMF protocol, ``baselines.md`` §1.5): Adam (betas 0.9/0.999, no weight
  decay) on every backbone tensor of θ_i for ``steps`` steps. Each step: prototypes of the clean
  support (with gradient), logits of the augmented support against them, cross-entropy. The clean
  and augmented supports go through the network in one batch (the clean one alone in a step that
  does not augment: it is then both). lr 0 is ``protonet``.
  θ_i is copied into one working copy of the backbone made once (optionally with gradient
  checkpointing of its blocks, ``full.grad_checkpointing``, and compiled, ``full.compile_backbone``).
* ``lora``: LoRA (rank 8, alpha 32, dropout 0.1 — inactive, the backbone runs in eval mode) on the
  query and value projections of every block, through ``peft``, with the same protocol on the LoRA
  parameters only. timm fuses q, k and v into one ``attn.qkv`` Linear; `split_qkv` replaces it by
  three Linears holding the row blocks [q; k; v] of its weight and bias, whose outputs are
  concatenated — the same function — so that peft can target ``q`` and ``v`` alone. The wrapped
  architecture is built once per backbone and called functionally with θ_i and the task's LoRA
  tensors (A drawn from the episode's generator as peft draws it, B = 0), so no model is copied per task.
* ``gradient_free`` (SMAT, paper Alg. 2): binary expert selection by forward passes only. Start from
  α' = round(σ(ℓ/T)); for R rounds and each expert m, flip α'_m, renormalise, and score the support
  cross-entropy; a candidate that lowers the current loss is accepted with probability ρ, one that
  does not with probability 1 − ρ; return the accepted α' of the lowest loss. The paper leaves R and ρ
  open: R = 6 rounds × M = 8 experts + the start = 49 evaluations ≈ the 50 of Table 5, ρ = 0.9.
* ``full_joint`` (SMAT, Table 4 column 4): fine-tune the hypernetwork, δ and the mask logits jointly on
  the support set (same loss and optimiser as ``full``), θ_pre frozen.

Support augmentation (PMF's DiffAugment, on normalised tensors): with probability 0.9 per step, flip
the whole batch horizontally with probability 0.5, then per image brightness + U(−0.5, 0.5),
saturation × U(0, 2) about the per-pixel channel mean, contrast × U(0.5, 1.5) about the image mean, and
an integer translation of up to 1/8 of the side with zero padding. Its randomness comes from the
episode's generator, so an adapted episode is reproducible.
"""

import copy
import hashlib
import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.checks import FLAG, configurable, integer, number, optional
from methods.backbones import compiles, derived, load_parameters, working_copy
from methods.base import autocast, cosine_logits, forward_features, inference_features, prototypes, support_query_features

__all__ = ["ADAPTERS", "get_adapter", "augment_support", "translate", "split_qkv", "searches_lr", "seeded_generator"]


def augment_support(x, generator, probability=0.9):
    """PMF's DiffAugment (colour + translation, batch flip) of a ``N×3×H×W`` batch; see the module docstring.

    Returns ``x`` itself when the step's coin says no augmentation. The random numbers are drawn on the
    CPU from ``generator`` (coin, flip, then per image brightness, saturation, contrast, dy, dx) and reach
    ``x``'s device in non-blocking copies, so a fine-tuning step never waits for the GPU.
    """
    if torch.rand((), generator=generator) >= probability:
        return x
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    brightness, saturation, contrast = _on_device(torch.rand(3, x.shape[0], 1, 1, 1, generator=generator), x)
    x = x + (brightness - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (saturation * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (contrast + 0.5) + mean
    return translate(x, generator)


def _on_device(t, like):
    """CPU tensor ``t`` on ``like``'s device (in ``like``'s dtype when floating), copied without blocking the host."""
    if t.is_floating_point():
        t = t.to(like.dtype)
    if like.device.type != "cuda":
        return t.to(like.device)
    return t.pin_memory().to(like.device, non_blocking=True)


def translate(x, generator, fraction=0.125):
    """Shift each image of ``x`` by its own integer (dy, dx), |dy| ≤ round(fraction·H), |dx| ≤ round(fraction·W), zero-filled.

    out[i, :, r, c] = x[i, :, r − dy_i, c − dx_i] where that pixel exists, else 0; one gather for the batch.
    """
    n, _, h, w = x.shape
    shift_h, shift_w = int(h * fraction + 0.5), int(w * fraction + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, (n,), generator=generator)
    dx = torch.randint(-shift_w, shift_w + 1, (n,), generator=generator)
    dy, dx = _on_device(torch.stack([dy, dx]), x)
    padded = F.pad(x, (shift_w, shift_w, shift_h, shift_h))
    rows = (torch.arange(h, device=x.device) + shift_h - dy[:, None])[:, None, :, None]  # n × 1 × h × 1
    cols = (torch.arange(w, device=x.device) + shift_w - dx[:, None])[:, None, None, :]  # n × 1 × 1 × w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def _finetune(parameters, loss_of, lr, steps):
    """``steps`` Adam steps on ``parameters`` minimising ``loss_of(step)``."""
    parameters = list(parameters)
    fused = all(p.device.type == "cuda" for p in parameters)  # one kernel per step for all tensors
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=fused or None)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_of(step).backward()
        optimizer.step()


def _support_loss(features_of, task, generator, scale, bias):
    """Loss of one fine-tuning step: augmented support against prototypes of the clean support."""
    n = len(task.support_x)
    augmented = augment_support(task.support_x, generator)
    if augmented is task.support_x:  # not augmented: one pass gives both prototypes and pseudo-queries
        support = pseudo_query = features_of(task.support_x)
    else:
        features = features_of(torch.cat([task.support_x, augmented]))
        support, pseudo_query = features[:n], features[n:]
    head = prototypes(support, task.support_y, task.ways)
    return F.cross_entropy(cosine_logits(pseudo_query, head, scale, bias), task.support_y)


def _predict(features_of, task, scale, bias):
    """Query predictions of the cosine ProtoNet head; support and query in one forward pass."""
    with torch.no_grad():
        support, query = support_query_features(features_of, task.support_x, task.query_x)
        return cosine_logits(query, prototypes(support, task.support_y, task.ways), scale, bias).argmax(-1)


def protonet(method, task, lr, generator):
    """No adaptation: the task model's ProtoNet predictions."""
    return method.task_model(task.support_x, task.support_y, task.ways).predict(task.query_x)


@configurable("full", "methods", steps=integer(0), grad_checkpointing=FLAG, compile_backbone=optional(FLAG),
              activation_memory_budget=optional(number(0, 1, "(]")))
def full(method, task, lr, generator, steps=50, grad_checkpointing=False, compile_backbone=None,
         activation_memory_budget=None):
    """Fine-tune every tensor of θ_i for ``steps`` Adam steps on the (augmented) support set.

    θ_i is copied into one working copy of the backbone, made once and reused by every task (no model
    is created per task). ``grad_checkpointing`` recomputes each block's activations in the backward
    pass (timm's ``set_grad_checkpointing``): about one more forward pass for far less memory.
    ``compile_backbone`` runs the working copy's compiled forward (`methods.backbones.working_copy`),
    fusing the forward and backward; None (default) compiles on CUDA (`methods.backbones.compiles`),
    where it made 50 steps 1.4× faster on an H100 (README, Performance; shapes then specialised to the
    episode), and not elsewhere. ``activation_memory_budget`` (compiled forward only; None keeps
    torch's) lets the compiled backward recompute the cheapest activations instead of keeping them,
    a finer trade than checkpointing whole blocks (`methods.backbones.working_copy`).
    """
    model = method.task_model(task.support_x, task.support_y, task.ways)
    if lr == 0 or steps == 0:
        return model.predict(task.query_x)
    device = task.support_x.device
    work, compiled = working_copy(method.backbone, "full", device, activation_memory_budget)
    params = load_parameters(work, model.params)
    work.eval().requires_grad_(True).set_grad_checkpointing(grad_checkpointing)
    forward = compiled if compiles(compile_backbone, device) else work

    def features_of(x):
        with autocast(device):
            return forward(x).float()

    try:
        _finetune(params, lambda _: _support_loss(features_of, task, generator, model.scale, model.bias), lr, steps)
        return _predict(features_of, task, model.scale, model.bias)
    finally:
        for p in params:
            p.grad = None  # the working copy keeps its weights until the next task, not their gradients


class _SplitQKV(nn.Module):
    """timm's fused ``qkv`` Linear as three Linears ``q``, ``k``, ``v``; forward concatenates them (same output)."""

    def __init__(self, fused):
        super().__init__()
        dim = fused.out_features // 3
        for i, name in enumerate("qkv"):
            part = nn.Linear(fused.in_features, dim, bias=fused.bias is not None,
                             device=fused.weight.device, dtype=fused.weight.dtype)
            part.weight.data.copy_(fused.weight.data[i * dim:(i + 1) * dim])
            if fused.bias is not None:
                part.bias.data.copy_(fused.bias.data[i * dim:(i + 1) * dim])
            setattr(self, name, part)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model):
    """Replace every ``attn.qkv`` of a timm ViT, in place, by `_SplitQKV`; returns ``model``."""
    for block in model.blocks:
        block.attn.qkv = _SplitQKV(block.attn.qkv)
    return model


class _LoRABackbone:
    """A backbone's architecture with split qkv and LoRA (peft) on the q and v projections, built once.

    Its own weights are never used: `features` calls it functionally with a task's θ_i (the rows of
    θ_i's fused ``qkv`` tensors are views for ``q``, ``k`` and ``v``) and that task's LoRA tensors, so
    adapting a task copies no model.
    """

    _QKV = re.compile(r"(.*\.attn\.qkv)\.([qkv])\.(weight|bias)")

    def __init__(self, backbone, rank, alpha, dropout):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                            target_modules=r".*attn\.qkv\.(q|v)")
        self.module = inject_adapter_in_model(config, split_qkv(copy.deepcopy(backbone))).eval().requires_grad_(False)
        self.lora_shapes = {n: p.shape for n, p in self.module.named_parameters() if "lora_" in n}
        self.theta_of = {}  # module parameter -> (θ name, row block of the fused qkv or None)
        for name, _ in self.module.named_parameters():
            if name not in self.lora_shapes:
                plain = name.replace(".base_layer", "")
                fused = self._QKV.fullmatch(plain)
                self.theta_of[name] = (f"{fused[1]}.{fused[3]}", "qkv".index(fused[2])) if fused else (plain, None)

    def fresh_lora(self, generator, device):
        """LoRA tensors as peft initialises them (A ~ kaiming-uniform(√5) = U(±1/√fan_in), B = 0), drawn from ``generator``."""
        lora = {}
        for name, shape in self.lora_shapes.items():
            tensor = torch.zeros(shape)
            if "lora_A" in name:
                bound = 1.0 / shape[1] ** 0.5
                tensor.uniform_(-bound, bound, generator=generator)
            lora[name] = tensor.to(device).requires_grad_()
        return lora

    def features(self, theta, lora, x):
        """CLS features (fp32) of ``x`` under θ_i (name -> tensor of the original backbone) plus ``lora``."""
        params = dict(lora)
        for name, (theta_name, block) in self.theta_of.items():
            tensor = theta[theta_name]
            params[name] = tensor if block is None else tensor.chunk(3)[block]
        return forward_features(self.module, params, x)


@configurable("lora", "methods", steps=integer(0), rank=integer(1), alpha=number(0, ends="(]"),
              dropout=number(0, 1, "[)"))
def lora(method, task, lr, generator, steps=50, rank=8, alpha=32, dropout=0.1):
    """LoRA on the q and v projections of θ_i (peft), fine-tuned like ``full`` on its own parameters."""
    model = method.task_model(task.support_x, task.support_y, task.ways)
    if lr == 0 or steps == 0:
        return model.predict(task.query_x)
    lora_backbone = derived(method.backbone, ("lora", rank, alpha, dropout, str(task.support_x.device)),
                             lambda backbone: _LoRABackbone(backbone, rank, alpha, dropout))
    theta = {n: p.detach() for n, p in model.params.items()}
    lora_params = lora_backbone.fresh_lora(generator, task.support_x.device)

    def features_of(x):
        with autocast(task.support_x.device):
            return lora_backbone.features(theta, lora_params, x)

    _finetune(list(lora_params.values()),
              lambda _: _support_loss(features_of, task, generator, model.scale, model.bias), lr, steps)
    return _predict(features_of, task, model.scale, model.bias)


@configurable("gradient_free", "methods", rounds=integer(0), accept_probability=number(0, 1))
def gradient_free(method, task, lr, generator, rounds=6, accept_probability=0.9):
    """SMAT's Alg. 2: binary expert selection by support loss, forward passes only (lr is unused).

    From the hypernetwork's rounded selection, each round flips every expert in turn; a flip that lowers
    the support loss is accepted with probability ``accept_probability`` (ρ), one that does not with 1 − ρ.
    Returns the predictions of the accepted selection (the first included) with the lowest support loss.
    """
    method.eval()
    with torch.no_grad():
        logits, _ = method.routing(task.support_x, task.support_y, task.ways)
        selection = (torch.sigmoid(logits / method.temperature()) > 0.5).float()
        if selection.sum() == 0:
            selection[logits.argmax()] = 1.0

        def params_of(binary):
            return method.merged_params(binary / binary.sum(), training=False)

        def support_loss(binary):
            support = inference_features(method.backbone, params_of(binary), task.support_x)
            head = prototypes(support, task.support_y, task.ways)
            return float(F.cross_entropy(cosine_logits(support, head), task.support_y))

        current_loss = best_loss = support_loss(selection)
        best = selection.clone()
        for _ in range(rounds):
            for m in range(len(selection)):
                candidate = selection.clone()
                candidate[m] = 1.0 - candidate[m]
                if candidate.sum() == 0:
                    continue
                loss = support_loss(candidate)
                improves = loss < current_loss
                u = float(torch.rand((), generator=generator))
                if u < (accept_probability if improves else 1.0 - accept_probability):
                    selection, current_loss = candidate, loss
                    if loss < best_loss:  # l* is recorded on acceptance only: a rejected candidate is never returned
                        best, best_loss = candidate.clone(), loss
        return _predict(partial(inference_features, method.backbone, params_of(best)), task, 10.0, 0.0)


@configurable("full_joint", "methods", steps=integer(0))
def full_joint(method, task, lr, generator, steps=50):
    """Fine-tune SMAT's hypernetwork, δ and mask logits jointly on the support set (θ_pre frozen)."""
    if lr == 0 or steps == 0:
        return protonet(method, task, lr, generator)
    adapted = method.task_copy().eval()

    def params():
        _, alpha = adapted.routing(task.support_x, task.support_y, task.ways)
        return adapted.merged_params(alpha, training=False)

    def features_of(x):
        with autocast(task.support_x.device):
            return forward_features(adapted.backbone, params(), x)

    trainable = [p for name, p in adapted.named_parameters() if not name.startswith("backbone.")]
    _finetune(trainable, lambda _: _support_loss(features_of, task, generator, 10.0, 0.0), lr, steps)
    with torch.no_grad():
        return _predict(partial(inference_features, adapted.backbone, params()), task, 10.0, 0.0)


ADAPTERS = {"protonet": protonet, "full": full, "lora": lora, "gradient_free": gradient_free, "full_joint": full_joint}
_SEARCHES_LR = {"full", "lora", "full_joint"}
_SMAT_ONLY = {"gradient_free", "full_joint"}


def searches_lr(name):
    """Whether adapter ``name`` has a learning rate to choose on validation episodes."""
    return name in _SEARCHES_LR


def get_adapter(name, method=None):
    """The adapter called ``name``; with ``method``, also check that it applies to that method.

    Raises:
        ValueError: unknown adapter, or an expert-selection adapter for a method without experts.
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose from {', '.join(ADAPTERS)}")
    if method is not None and name in _SMAT_ONLY and not hasattr(method, "masks"):
        raise ValueError(f"adapter {name!r} needs SMAT's experts; method {method.name!r} has none")
    return ADAPTERS[name]


def seeded_generator(*key):
    """A CPU ``torch.Generator`` seeded from ``key`` (e.g. an episode identity), for reproducible adaptation."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % (2**63))
