"""The task hypernetwork h_ζ: support prototypes of frozen pre-trained features -> M expert logits.

Following the official SMAT code (``smat_official_code.md`` §3), with its parameters registered
(the official HEAD never trains or saves the keys and skill tokens; that bug is not reproduced):

1. tokens = [P; S]: the C class prototypes of θ_pre's support features, then ``num_skill_tokens``
   learned tokens (init N(0, 1e-3²)); no positional encoding;
2. one pre-norm transformer block (timm ``Block``: ``num_heads`` heads, MLP ratio 2, no qkv bias,
   ``nn.LayerNorm`` with its default eps 1e-5) with spectral normalisation on each of its Linear layers;
3. e = the block's output at token 0 (the first prototype's position);
4. logits ℓ = K e with expert keys K ∈ R^{M×d} (Kaiming-normal, fan-in d).

`gumbel_sigmoid_weights` turns logits into merging weights: s = σ((ℓ + log u − log(1 − u)) / T)
with u ~ U(0, 1) in training (a relaxed Bernoulli sample) and s = σ(ℓ / T) at evaluation, then
α = s / (Σ_m s_m + 1e-8).
"""

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["PrototypeRouter", "gumbel_sigmoid_weights"]


class PrototypeRouter(nn.Module):
    """h_ζ: ``C × d`` prototypes -> ``M`` routing logits.

    Args:
        dim: feature width d of the backbone.
        num_experts: M.
        num_heads: attention heads of the block (must divide ``dim``).
        num_skill_tokens: learned tokens appended to the prototypes.
    """

    def __init__(self, dim, num_experts, num_heads=4, num_skill_tokens=4):
        super().__init__()
        self.block = Block(dim, num_heads=num_heads, mlp_ratio=2.0, qkv_bias=False, norm_layer=nn.LayerNorm)
        for module in (self.block.attn.qkv, self.block.attn.proj, self.block.mlp.fc1, self.block.mlp.fc2):
            spectral_norm(module)
        self.skill_tokens = nn.Parameter(torch.randn(num_skill_tokens, dim) * 1e-3)
        self.expert_keys = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.kaiming_normal_(self.expert_keys, mode="fan_in", nonlinearity="relu")  # std sqrt(2 / d)

    def forward(self, class_prototypes):
        tokens = torch.cat([class_prototypes, self.skill_tokens.to(class_prototypes.dtype)], 0).unsqueeze(0)
        task_embedding = self.block(tokens)[0, 0]
        return self.expert_keys @ task_embedding.to(self.expert_keys.dtype)


def gumbel_sigmoid_weights(logits, temperature, training):
    """Normalised Gumbel-sigmoid weights α (``M``): relaxed Bernoulli samples in training, σ(ℓ/T) otherwise."""
    if training:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        logits = logits + torch.log(u) - torch.log1p(-u)
    s = torch.sigmoid(logits / temperature)
    return s / (s.sum() + 1e-8)
