"""SoftMerge: SMEAR-style soft merging of dense experts in parameter space, routed per task.

**A reconstruction.** The SMAT paper names this baseline after SMEAR (Muqeeth et al.) but gives no
implementation, and no released code has it. This follows the reconstruction recommended in
``baselines.md`` §4.3, chosen so that it differs from SMAT only in how experts are formed and merged:

* M dense deltas δ_m over every backbone tensor, zero-initialised (the model starts at θ_pre);
* routing weights α = softmax(h_ζ(prototypes)) from the same prototype hypernetwork as SMAT
  (`methods.router.PrototypeRouter`), with SMEAR's expert dropout (each α_m zeroed with
  probability ``expert_dropout`` during meta-training, the rest renormalised);
* θ_i = θ_pre + Σ_m α_m δ_m, i.e. exactly the SMEAR average of the M models θ_pre + δ_m (Σα = 1);
* loss: the query cross-entropy of the cosine ProtoNet head (s = 10 fixed, as SMAT); no masks,
  sparsity constraint or dense teacher;
* optimisation as SMAT: SGD (momentum 0.9, weight decay 1e-4) on the deltas, AdamW with gradient
  clipping on the router, 4 tasks per update.
"""

from functools import partial

import torch
import torch.nn.functional as F

from benchmark.checks import check, integer, number, optional
from methods._registry import register_method
from methods.base import (Method, TaskModel, cosine_logits, forward_features, inference_features, prototypes,
                          query_metrics, support_query_features)
from methods.experts import ExpertDeltas, expert_parameter_names
from methods.router import PrototypeRouter


RULES = dict(  # of `SoftMerge`'s own arguments (`Method` checks the rest)
    num_experts=integer(1), expert_dropout=number(0, 1), delta_lr=number(0), delta_momentum=number(0, 1, "[)"),
    delta_weight_decay=number(0), router_lr=number(0), router_weight_decay=number(0),
    router_clip=optional(number(0, ends="(]")),
)


@register_method("softmerge")
class SoftMerge(Method):
    """Soft merging of M dense experts with task-level softmax routing (a reconstruction; see the module).

    Args:
        backbone: a timm ViT; its parameters are θ_pre and stay frozen.
        num_experts: M.
        expert_dropout: probability of dropping each routing weight during meta-training.
        delta_lr, delta_momentum, delta_weight_decay: SGD on the deltas.
        router_lr, router_weight_decay, router_clip: AdamW on the router and its gradient-norm clip.
        tasks_per_step, warmup_fraction, min_lr: see `Method`.
    """

    rules = {**Method.rules, **RULES}

    def __init__(self, backbone, num_experts=8, expert_dropout=0.1, delta_lr=1e-4, delta_momentum=0.9,
                 delta_weight_decay=1e-4, router_lr=1e-4, router_weight_decay=1e-2, router_clip=1.0,
                 tasks_per_step=4, warmup_fraction=0.2, min_lr=1e-6):
        check(self.name, locals(), RULES)
        super().__init__(backbone, tasks_per_step, warmup_fraction, min_lr)
        self.expert_dropout = expert_dropout
        self.delta_lr, self.delta_momentum, self.delta_weight_decay = delta_lr, delta_momentum, delta_weight_decay
        self.router_lr, self.router_weight_decay, self.router_clip = router_lr, router_weight_decay, router_clip
        self.backbone.requires_grad_(False)
        self.deltas = ExpertDeltas(backbone, expert_parameter_names(backbone), num_experts, shared=False)
        self.router = PrototypeRouter(backbone.num_features, num_experts)

    def routing_weights(self, support_x, support_y, ways):
        """α = softmax(h_ζ(prototypes of θ_pre's support features)), with expert dropout in training."""
        features = inference_features(self.backbone, self.pretrained_params(), support_x)
        alpha = torch.softmax(self.router(prototypes(features, support_y, ways)).float(), -1)
        if self.training and self.expert_dropout > 0:
            keep = (torch.rand_like(alpha) >= self.expert_dropout).float()
            never_none = F.one_hot(alpha.argmax(), len(alpha)).float() * (keep.sum() == 0)  # keep the top one then
            keep = torch.maximum(keep, never_none)
            alpha = alpha * keep / (alpha * keep).sum()
        return alpha

    def parameter_groups(self):
        return [
            (torch.optim.SGD, [dict(params=list(self.deltas.parameters()), lr=self.delta_lr,
                                    momentum=self.delta_momentum, weight_decay=self.delta_weight_decay)], None),
            (torch.optim.AdamW, [dict(params=list(self.router.parameters()), lr=self.router_lr,
                                      weight_decay=self.router_weight_decay)], self.router_clip),
        ]

    def task_loss(self, task):
        alpha = self.routing_weights(task.support_x, task.support_y, task.ways)
        params = self.deltas.merge(self.pretrained_params(), alpha)
        support, query = support_query_features(partial(forward_features, self.backbone, params),
                                                task.support_x, task.query_x)
        logits = cosine_logits(query, prototypes(support, task.support_y, task.ways))
        ce = F.cross_entropy(logits, task.query_y)
        metrics = {"query_ce": ce.detach(), **query_metrics(logits.detach(), task.query_y)}
        metrics.update({f"alpha_{m}": a for m, a in enumerate(alpha.detach())})
        return ce, metrics

    def describe_task(self, support_x, support_y, ways):
        """The task's softmax routing weights (evaluation mode), for result rows."""
        self.eval()
        with torch.no_grad():
            return {"routing_weights": self.routing_weights(support_x, support_y, ways).tolist()}

    def task_model(self, support_x, support_y, ways):
        self.eval()
        with torch.no_grad():
            alpha = self.routing_weights(support_x, support_y, ways)
            params = self.deltas.merge(self.pretrained_params(), alpha)
        return TaskModel(self.backbone, params).fit(support_x, support_y, ways)
