"""Experts in parameter space: hard-concrete masks and dense deltas, merged into a task's θ_i.

**Merge.** For every backbone tensor p that has experts, with merging weights α ∈ R^M,

    interpolated experts (one shared δ):  θ_i[p] = θ_pre[p] + δ[p] ⊙ Σ_m α_m z_m[p]      (paper Eq. 1, 7)
    separate experts (one δ_m per expert): θ_i[p] = θ_pre[p] + Σ_m α_m (z_m[p] ⊙ δ_m[p])

with z_m ≡ 1 when the experts have no masks. Tensors without experts stay θ_pre. The result is a
name -> tensor dict for ``torch.func.functional_call``: no copy of the model is made.

**Hard-concrete masks** (Louizos et al., 2018), one gate per element per expert, with log α the
location, β = 2/3 the temperature and (γ, ζ) = (−0.1, 1.1) the stretch:

    training:    u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β)
    evaluation:  s = σ(log α)
    z = min(1, max(0, s (ζ − γ) + γ))

The probability that a gate is non-zero is P(z ≠ 0) = 1 − Q(0) = σ(log α − β log(−γ / ζ)), so an
expert's expected density is the mean of that over its elements, and its expected sparsity is one
minus the density (the quantity SMAT constrains to be at least τ).
"""

import math

import torch
import torch.nn as nn

__all__ = ["HardConcreteMasks", "ExpertDeltas", "expert_parameter_names"]

GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0


def expert_parameter_names(backbone, where="all"):
    """Names of the backbone tensors that get experts: ``all`` of them, or only ``mlp`` (fc1/fc2 of each block)."""
    names = [name for name, _ in backbone.named_parameters()]
    if where == "all":
        return names
    if where == "mlp":
        return [n for n in names if ".mlp.fc1." in n or ".mlp.fc2." in n]
    raise ValueError(f"experts where={where!r}: choose 'all' or 'mlp'")


class HardConcreteMasks(nn.Module):
    """M hard-concrete gates per element of each tensor in ``shapes`` (log α init N(0, init_std²)).

    Args:
        shapes: [tensor shape], in the order the deltas use.
        num_experts: M.
        init_std: standard deviation of the initial log α (0.5 in the official code).
    """

    def __init__(self, shapes, num_experts, init_std=0.5):
        super().__init__()
        self.log_alpha = nn.ParameterList(
            [nn.Parameter(torch.randn(*shape, num_experts) * init_std) for shape in shapes]
        )
        self.numel = sum(math.prod(shape) for shape in shapes)

    def sample(self, training):
        """[z] with z of shape ``(*p.shape, M)``: noisy gates in training, deterministic at evaluation."""
        gates = []
        for log_alpha in self.log_alpha:
            if training:
                u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
            else:
                s = torch.sigmoid(log_alpha)
            gates.append((s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0))
        return gates

    def nonzero_probability_sums(self):
        """(M,) Σ over elements of P(z ≠ 0): the expected L0 norm of each expert (differentiable)."""
        shift = BETA * math.log(-GAMMA / ZETA)
        return sum(torch.sigmoid(la - shift).reshape(-1, la.shape[-1]).sum(0) for la in self.log_alpha)

    def expected_sparsity(self):
        """(M,) 1 − E[L0] / N per expert."""
        with torch.no_grad():
            return 1.0 - self.nonzero_probability_sums() / self.numel

    def l0_sparsity(self):
        """(M,) fraction of exactly-zero gates of the deterministic (evaluation) masks."""
        with torch.no_grad():
            zeros = sum((z == 0).reshape(-1, z.shape[-1]).sum(0) for z in self.sample(training=False))
            return zeros.float() / self.numel


class ExpertDeltas(nn.Module):
    """Dense deltas (zero init) over the tensors ``names`` of a backbone: shared, or one per expert.

    Args:
        backbone: the timm module the names refer to.
        names: tensors with experts.
        num_experts: M.
        shared: True: one δ for all experts (interpolated experts); False: δ_m per expert.
    """

    def __init__(self, backbone, names, num_experts, shared):
        super().__init__()
        params = dict(backbone.named_parameters())
        self.names, self.shared, self.num_experts = list(names), shared, num_experts
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.delta = nn.ParameterList(
            [nn.Parameter(torch.zeros(*shape) if shared else torch.zeros(*shape, num_experts)) for shape in self.shapes]
        )

    def merge(self, pretrained, alpha, gates=None):
        """θ_i as a dict: ``pretrained`` (name -> tensor) plus the α-weighted (gated) expert deltas."""
        merged = dict(pretrained)
        alpha = alpha.float()
        for i, (name, delta) in enumerate(zip(self.names, self.delta)):
            weights = alpha if gates is None else gates[i] * alpha  # (M,) or (*shape, M)
            if self.shared:
                update = delta * (weights.sum(-1) if gates is not None else weights.sum())
            else:
                update = delta @ alpha if gates is None else (delta * weights).sum(-1)
            merged[name] = pretrained[name] + update.to(pretrained[name].dtype)
        return merged
