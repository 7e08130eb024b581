"""Backbones: timm Vision Transformers by name, features = the CLS token after the final norm.

Every backbone is built by ``timm.create_model(name, pretrained=..., num_classes=0,
dynamic_img_size=True)``: ``num_classes=0`` with timm's ``global_pool='token'`` returns the normed
CLS token, and ``dynamic_img_size`` resamples the position embeddings to the input's patch grid at
every forward, so one model serves 128-px Meta-Dataset sources and 224-px Sketch/Clipart/Pet/Food/Cars.
timm resamples bicubically with antialiasing; DINO and PMF (and the HF ViT of the SMAT code) resample
bicubically by a scale factor of (grid + 0.1) / 14 without it, so at 128 px the features differ a little
from theirs (the same for every method here, so comparisons between methods are unaffected).

Names are timm names with weight tags: ``vit_small_patch16_224.dino`` (DINO ViT-S/16, the paper's
default), ``vit_small_patch16_224.augreg_in21k`` (Sup-21K ViT-S/16, Table 3),
``vit_small_patch14_dinov2.lvd142m`` or any other timm ViT. Weights come from timm's hub or from a
local file (``weights_file``); offline without one, `create_backbone` says how to supply it.

``smat_vit_mini_patch4_32`` is a tiny ViT (4 blocks, width 64, 32-px inputs) registered with timm
for the embedded mini benchmark and the tests; it is timm's ``VisionTransformer`` with small kwargs.
"""

import copy
import functools
import os
import weakref

import gin
import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch.func import functional_call

from registry.errors import DataError

__all__ = ["create_backbone", "derived", "working_copy", "compiled_functional", "grad_keeping_graph", "load_parameters",
           "compiles", "MINI_BACKBONE"]

MINI_BACKBONE = "smat_vit_mini_patch4_32"

default_cfgs = generate_default_cfgs({  # read by timm's register_model: no hub weights, 32-px input
    MINI_BACKBONE: dict(input_size=(3, 32, 32), num_classes=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
})


@register_model
def smat_vit_mini_patch4_32(pretrained=False, **kwargs):
    """Tiny ViT for 32-px images: patch 4 (an 8×8 grid), width 64, depth 4, 4 heads, MLP ratio 2.

    It has no hub weights: pre-trained weights come from a local file (``weights_file``).
    """
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    return build_model_with_cfg(VisionTransformer, MINI_BACKBONE, pretrained, **{**args, **kwargs})


def create_backbone(name="vit_small_patch16_224.dino", pretrained=True, weights_file=None):
    """A timm ViT returning ``B × D`` CLS features; frozen parameters are the caller's business.

    Args:
        name: timm model name, optionally with a weight tag.
        pretrained: load pre-trained weights (from ``weights_file`` if given, else timm's hub).
        weights_file: a local ``.safetensors``/``.pth``/``.bin`` checkpoint for ``name``.

    Raises:
        DataError: unknown model name, missing weights file, or no weights obtainable (offline).
    """
    base = name.split(".")[0]
    if not timm.is_model(base):
        close = timm.list_models(f"*{base.split('_')[0]}*")[:5]
        raise DataError(f"backbone {name!r} is not a timm model; e.g. {', '.join(close) or 'vit_small_patch16_224.dino'}")
    kwargs = dict(num_classes=0, dynamic_img_size=True)
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise DataError(f"backbone weights_file {weights_file} does not exist; fix `create_backbone.weights_file` in gin")
        kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(weights_file))
    try:
        return timm.create_model(name, pretrained=pretrained or weights_file is not None, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if weights_file is not None or not pretrained:
            raise
        raise DataError(
            f"could not load pre-trained weights for backbone {name!r} ({type(err).__name__}: {err}). "
            "On a machine with internet, timm downloads them to the Hugging Face cache; offline, download "
            "the checkpoint elsewhere and bind `create_backbone.weights_file = '/path/to/model.safetensors'`"
        ) from None


gin.register(create_backbone, module="methods")


_DERIVED = weakref.WeakKeyDictionary()  # backbone -> {key: an object built from it once, reused by every task}


def derived(backbone, key, build):
    """``build(backbone)``, made once per (backbone, ``key``) and kept while the backbone lives."""
    built = _DERIVED.setdefault(backbone, {})
    if key not in built:
        built[key] = build(backbone)
    return built[key]


COMPILED_VARIANTS = 64  # graphs one compiled forward may hold (dynamo's default of 8 is shared by every ViT copy)


def _within_variant_limit(compiled):
    """``compiled`` (a `torch.compile` result) called with dynamo's graph limit raised to `COMPILED_VARIANTS`."""
    def call(*args):
        with torch._dynamo.config.patch(cache_size_limit=COMPILED_VARIANTS):
            return compiled(*args)

    return call


@functools.cache
def _inductor_backend(**functorch_settings):
    """torch.compile's inductor backend, compiling under ``torch._functorch.config`` ``functorch_settings``
    (none: plain ``"inductor"``). Dynamo compiles a module's graphs once per code object and backend, not
    per functorch setting or module instance, so each setting needs a backend of its own."""
    if not functorch_settings:
        return "inductor"
    inductor = torch._dynamo.lookup_backend("inductor")

    def inductor_with_settings(graph, example_inputs):
        with torch._functorch.config.patch(**functorch_settings):
            return inductor(graph, example_inputs)

    return inductor_with_settings


def working_copy(backbone, purpose, device, activation_memory_budget=None):
    """(copy, compiled forward): a deep copy of ``backbone`` on ``device`` and its forward compiled by
    `torch.compile`, made once per (backbone, ``purpose``, device, budget) and reused by every task.

    A task's θ is loaded into the copy's own parameters (`load_parameters`), so no model is created per
    task. The compiled forward treats batch sizes as dynamic and reads the copy's parameters at every
    call, so new tasks and new values cost no recompilation; it compiles once per grad mode, train/eval
    mode and patch grid it meets. Dynamo counts those graphs per code object, and every
    copy of a ViT shares ``VisionTransformer.forward``, so the limit is raised to `COMPILED_VARIANTS`
    for these calls: past dynamo's default of 8 it would silently run further variants eagerly.

    ``activation_memory_budget`` (in (0, 1]; None keeps torch's setting) caps, as a share of what the
    compiled forward would otherwise keep for the backward pass, the activations it keeps: the
    partitioner (``torch._functorch.config.activation_memory_budget``) recomputes the cheapest of the
    others in the backward pass. Gradients are unchanged; only memory and time move.
    """
    def build(model):
        model = copy.deepcopy(model).to(device)
        settings = {} if activation_memory_budget is None else dict(activation_memory_budget=activation_memory_budget)
        compiled = torch.compile(model, dynamic=True, backend=_inductor_backend(**settings))
        return model, _within_variant_limit(compiled)

    return derived(backbone, ("working copy", purpose, str(device), activation_memory_budget), build)


def compiled_functional(backbone):
    """``f(params, x)``: ``backbone``'s forward under ``params`` (name -> tensor) through `torch.compile`,
    gradients flowing into ``params``; made once per backbone. The batch size is dynamic, the shapes of
    ``params`` static (as a module's own parameters are: with symbolic shapes, the backward of timm's
    position-embedding resampling fails to compile), and ``params`` are graph inputs, so new values
    cost no recompilation; it compiles once per train/eval mode and per pattern of which tensors
    require gradients (`COMPILED_VARIANTS` applies as in `working_copy`). Its backward keeps the
    activations it reads (no donated buffers), so a forward can be gone back through twice
    (``retain_graph``: SMAT's teacher takes its gradient through the student's query pass)."""
    def build(model):
        compiled = _within_variant_limit(torch.compile(_functional_forward, backend=_inductor_backend(donated_buffer=False)))
        model = weakref.ref(model)  # what `derived` keeps must not keep the backbone, its key, alive

        def forward(params, x):
            torch._dynamo.maybe_mark_dynamic(x, 0)
            return compiled(model(), params, x)

        return forward

    return derived(backbone, ("compiled functional",), build)


def _functional_forward(module, params, x):
    return functional_call(module, params, (x,))


def grad_keeping_graph(output, inputs):
    """``torch.autograd.grad(output, inputs, retain_graph=True)``, through `compiled_functional`'s passes
    too: their backward donates no buffers to its outputs, but torch checks its global switch for
    donation (``torch._functorch.config.donated_buffer``) whenever a graph is kept, so it is off here."""
    with torch._functorch.config.patch(donated_buffer=False):
        return torch.autograd.grad(output, inputs, retain_graph=True)


def load_parameters(module, params):
    """Copy ``params`` (name -> tensor, one per parameter of ``module``) into ``module``'s own parameters
    with one foreach copy; returns those parameters as a list."""
    names, own = zip(*module.named_parameters())
    with torch.no_grad():
        torch._foreach_copy_(list(own), [params[n] for n in names])
    return list(own)


def compiles(compile_backbone, device):
    """Whether a ``compile_backbone`` switch compiles on ``device``. None means on CUDA GPUs that
    `torch.compile`'s Triton kernels support (compute capability 7.0, V100, and newer) and nowhere else."""
    if compile_backbone is not None:
        return bool(compile_backbone)
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)
