"""Experts in parameter space: hard-concrete masks and dense deltas, merged into a task's θ_i.

Every expert tensor lives in one flat vector (`ParameterLayout`): the deltas are one ``N`` (shared)
or ``N × M`` (one per expert) parameter and the mask logits one ``N × M`` parameter, N being the
number of elements of all tensors with experts. So sampling the gates and merging are a handful of
tensor operations over the whole backbone, not a Python loop over its tensors.

**Merge.** For every backbone tensor p that has experts, with merging weights α ∈ R^M,

    interpolated experts (one shared δ):  θ_i[p] = θ_pre[p] + δ[p] ⊙ Σ_m α_m z_m[p]      (paper Eq. 1, 7)
    separate experts (one δ_m per expert): θ_i[p] = θ_pre[p] + Σ_m α_m (z_m[p] ⊙ δ_m[p])

with z_m ≡ 1 when the experts have no masks. Over the flat vector, Σ_m α_m z_m is one matrix-vector
product Z α (Z = N × M). Tensors without experts stay θ_pre. The result is a name -> tensor dict for
``torch.func.functional_call``: no copy of the model is made. The merge runs in fp32 (outside any
autocast), so bf16 training changes the forward passes, not θ_i.

**Hard-concrete masks** (Louizos et al., 2018), one gate per element per expert, with log α the
location, β = 2/3 the temperature and (γ, ζ) = (−0.1, 1.1) the stretch:

    training:    u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β)
    evaluation:  s = σ(log α)
    z = min(1, max(0, s (ζ − γ) + γ))

The probability that a gate is non-zero is P(z ≠ 0) = 1 − Q(0) = σ(log α − β log(−γ / ζ)), so an
expert's expected density is the mean of that over its elements, and its expected sparsity is one
minus the density: the differentiable stand-in, in SMAT's penalty, for the L0 sparsity of the
evaluation masks that SMAT constrains to be at least τ.
"""

import functools
import math

import torch
import torch.nn as nn

from benchmark.checks import FLAG, configurable, optional
from methods.backbones import compiles

__all__ = ["ParameterLayout", "HardConcreteMasks", "ExpertDeltas", "StepExperts", "expert_parameter_names",
           "expert_matrix", "hard_concrete", "interpolate", "gated_update"]

GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
LOG_ALPHA_BOUND = math.log(100.0)
# an evaluation gate is 0 iff σ(log α)(ζ − γ) + γ ≤ 0, i.e. σ(log α) ≤ −γ / (ζ − γ) = 1/12, i.e. log α ≤ −ln 11
ZERO_GATE_LOG_ALPHA = math.log(-GAMMA / ZETA)


def expert_parameter_names(backbone, where="all"):
    """Names of the backbone tensors that get experts: ``all`` of them, or only ``mlp`` (fc1/fc2 of each block)."""
    names = [name for name, _ in backbone.named_parameters()]
    if where == "all":
        return names
    if where == "mlp":
        return [n for n in names if ".mlp.fc1." in n or ".mlp.fc2." in n]
    raise ValueError(f"experts where={where!r}: choose 'all' or 'mlp'")


class ParameterLayout:
    """Named tensors laid end to end in one flat vector: tensor k is ``flat[start_k : start_k + numel_k]``.

    Args:
        names: tensor names, in layout order.
        shapes: their shapes.
    """

    def __init__(self, names, shapes):
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)

    def split(self, flat):
        """Views of ``flat`` (``N × ...``) as the layout's tensors (``shape_k × ...``), in layout order."""
        trailing = flat.shape[1:]
        return [part.view(*shape, *trailing) for part, shape in zip(flat.split(self.sizes), self.shapes)]


@configurable("hard_concrete", "methods", compile_gates=optional(FLAG))
def hard_concrete(log_alpha, training, compile_gates=None):
    """Hard-concrete gates z of locations ``log_alpha`` (any shape): noisy in training, deterministic otherwise.

    ``compile_gates`` (None: on CUDA, `methods.backbones.compiles`) computes the training gates from
    their noise u in one fused kernel, and their backward in another, keeping only u for the backward
    (eager keeps two N × M tensors): about a dozen passes over N × M floats become one each way. u is
    drawn outside, so both paths give the same gates for the same random state.
    """
    if not training:
        return _stretched(torch.sigmoid(log_alpha))
    u = torch.rand_like(log_alpha)
    if compiles(compile_gates, log_alpha.device):
        return _compiled_training_gates()(log_alpha, u)
    return _training_gates(log_alpha, u)


def _stretched(s):
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _training_gates(log_alpha, u):
    """z of noise ``u`` ~ U(0, 1) (clamped to [1e-6, 1 − 1e-6]): stretched σ((log u − log(1 − u) + log α) / β)."""
    u = u.clamp(1e-6, 1 - 1e-6)
    return _stretched(torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA))


@functools.cache
def _compiled_training_gates():
    return torch.compile(_training_gates)


def expert_matrix(delta, gates=None):
    """E (``N × M``), what multiplies α in the merge: Z for a shared ``N`` δ, δ ⊙ Z for an ``N × M`` one
    (δ itself without gates); None for a shared δ without gates, whose update is δ · Σ_m α_m."""
    if delta.dim() == 1:
        return gates
    return delta * gates if gates is not None else delta


def _update(delta, mixed):
    """θ_i − θ_pre from the mixture E α (``N``): scaled by a shared δ, as is for one δ per expert."""
    return delta * mixed if delta.dim() == 1 else mixed


def interpolate(delta, alpha, gates=None):
    """The flat update θ_i − θ_pre: δ ⊙ (Z α) for a shared ``N`` δ, (δ ⊙ Z) α for an ``N × M`` one (Z ≡ 1 without gates).

    Computed in fp32 outside autocast.
    """
    with torch.autocast(delta.device.type, enabled=False):
        alpha = alpha.float()
        matrix = expert_matrix(delta, gates)
        return _update(delta, torch.mv(matrix, alpha) if matrix is not None else alpha.sum())


def gated_update(delta, log_alpha, alpha, training):
    """`interpolate` with hard-concrete gates sampled from ``log_alpha``."""
    return interpolate(delta, alpha, hard_concrete(log_alpha, training))


class _DeferredProduct(torch.autograd.Function):
    """E α for a constant E (N × M): the backward gives α its gradient Eᵀ g and files (g, α) in ``pending``."""

    @staticmethod
    def forward(ctx, alpha, matrix, pending):
        ctx.save_for_backward(alpha, matrix)
        ctx.pending = pending
        return torch.mv(matrix, alpha)

    @staticmethod
    def backward(ctx, grad):
        alpha, matrix = ctx.saved_tensors
        ctx.pending.append((grad, alpha.detach()))
        return torch.mv(matrix.t(), grad), None, None


class StepExperts:
    """The expert matrix E of one meta-training step, shared by the step's tasks, its gradient deferred.

    E (N × M, `expert_matrix`) is what multiplies α in the merge. It is built once per step, with one
    hard-concrete noise draw for all the step's tasks. Task i multiplies a constant copy of E by α_i:
    its backward gives α_i the gradient Eᵀ g_i at once and keeps g_i = ∂L/∂(E α_i). `backward` then sends

        ∂L/∂E = Σ_i g_i α_iᵀ = G Aᵀ        (G = [g_1 … g_T], A = [α_1 … α_T])

    through E's construction in one pass. The gradients are those of one graph per task, but the N × M
    work of a step (sampling the gates, their backward) is done once instead of once per task.

    Args:
        delta: δ, ``N`` (shared) or ``N × M``.
        gates: Z (``N × M``, with its graph to log α), or None.
    """

    def __init__(self, delta, gates=None):
        self.delta = delta
        with torch.autocast(delta.device.type, enabled=False):
            self.matrix = expert_matrix(delta, gates)
        if self.matrix is None:
            raise ValueError("StepExperts needs gates for a shared δ (its update δ · Σα has no expert matrix)")
        self._constant = self.matrix.detach()
        self._pending = []

    def update(self, alpha):
        """The flat update θ_i − θ_pre of merging weights ``alpha`` (as `interpolate`), in fp32."""
        with torch.autocast(self.delta.device.type, enabled=False):
            return _update(self.delta, _DeferredProduct.apply(alpha.float(), self._constant, self._pending))

    def alpha_sum(self):
        """Σ_i α_i over the tasks whose backward has run (detached)."""
        return sum(alpha for _, alpha in self._pending)

    def backward(self, penalty=None):
        """Send Σ_i g_i α_iᵀ back through E (and ``penalty``, a scalar loss of the step, if given)."""
        grads, alphas = zip(*self._pending)
        tensors, grad_tensors = [self.matrix], [torch.stack(grads, 1) @ torch.stack(alphas)]
        if penalty is not None:
            tensors.append(penalty)
            grad_tensors.append(torch.ones_like(penalty))
        torch.autograd.backward(tensors, grad_tensors)
        self._pending.clear()


class HardConcreteMasks(nn.Module):
    """M hard-concrete gates per element of an ``N``-element layout (log α init N(0, init_std²)).

    Args:
        numel: N, the number of gated elements.
        num_experts: M.
        init_std: standard deviation of the initial log α (0.5 in the official code).
    """

    def __init__(self, numel, num_experts, init_std=0.5):
        super().__init__()
        self.numel = numel
        self.log_alpha = nn.Parameter(torch.randn(numel, num_experts) * init_std)

    def sample(self, training):
        """The gates Z (``N × M``): noisy in training, deterministic at evaluation."""
        return hard_concrete(self.log_alpha, training)

    def expected_density(self):
        """(M,) E[L0] / N per expert: the mean over elements of P(z ≠ 0) (differentiable)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).mean(0)

    def expected_sparsity(self):
        """(M,) 1 − E[L0] / N per expert."""
        with torch.no_grad():
            return 1.0 - self.expected_density()

    @torch.no_grad()
    def clamp_(self, bound=LOG_ALPHA_BOUND):
        """Clamp log α into [−bound, bound] in place (the official code's [ln 0.01, ln 100]): after a step of
        the official size, a gate far outside it would get no gradient to come back."""
        self.log_alpha.clamp_(-bound, bound)

    def l0_sparsity(self):
        """(M,) fraction of exactly-zero gates of the deterministic (evaluation) masks, counted on log α
        (`ZERO_GATE_LOG_ALPHA`) in one comparison instead of building the N × M gates."""
        with torch.no_grad():
            return (self.log_alpha <= ZERO_GATE_LOG_ALPHA).sum(0).float() / self.numel


class ExpertDeltas(nn.Module):
    """Dense deltas (zero init) over the tensors ``names`` of a backbone: shared, or one per expert.

    Args:
        backbone: the timm module the names refer to.
        names: tensors with experts.
        num_experts: M.
        shared: True: one δ for all experts (interpolated experts, ``N``); False: δ_m per expert (``N × M``).
    """

    def __init__(self, backbone, names, num_experts, shared):
        super().__init__()
        params = dict(backbone.named_parameters())
        self.layout = ParameterLayout(names, [params[n].shape for n in names])
        self.names, self.num_experts = self.layout.names, num_experts
        self.delta = nn.Parameter(torch.zeros(self.layout.numel) if shared else torch.zeros(self.layout.numel, num_experts))

    @property
    def shared(self):
        """Whether one δ serves every expert (``N``) rather than one δ_m each (``N × M``)."""
        return self.delta.dim() == 1

    def tensors(self):
        """name -> view of δ for that tensor (``shape`` or ``shape × M``)."""
        return dict(zip(self.names, self.layout.split(self.delta)))

    def add_to(self, pretrained, update):
        """θ_i as a dict: ``pretrained`` (name -> tensor) plus the flat ``update`` on the expert tensors."""
        merged = dict(pretrained)
        views = self.layout.split(update)
        # one fused (foreach) addition over every expert tensor instead of a Python loop
        merged.update(zip(self.names, torch._foreach_add([pretrained[n] for n in self.names], views)))
        return merged

    def merge(self, pretrained, alpha, gates=None):
        """θ_i as a dict: ``pretrained`` plus the α-weighted (gated) expert deltas (`interpolate`)."""
        return self.add_to(pretrained, interpolate(self.delta, alpha, gates))
