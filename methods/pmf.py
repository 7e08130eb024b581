"""PMF (Hu et al., CVPR 2022): meta-tune every backbone parameter with the ProtoNet loss.

Follows ``baselines.md`` §1: cosine ProtoNet head with a learned scale s (init 10) and bias b (init 0);
query cross-entropy on variable-way/shot episodes; SGD with momentum 0.9 and no weight decay; a
warm-up from 1e-6 over the first 5% of the run (5 of 100 epochs), then cosine to 1e-6. The defaults
are PMF's README command on 8 GPUs: 8 episodes per update (one per GPU, gradients averaged) at peak
lr 5e-4; on one GPU the 8 episodes of an update run one after another. (PMF's code divides its
command-line lr by 8 on one GPU, ``lr × world_size / 8``, so the same command there gives one
episode per update at 6.25e-5; ``lr`` here is always the effective peak learning rate.) The model
stays in eval mode (no dropout or drop-path in DINO ViT-S anyway).
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.checks import check, number
from methods._registry import register_method
from methods.base import (Method, TaskModel, cosine_logits, forward_features, prototypes, query_metrics,
                          support_query_features)


RULES = dict(lr=number(0), momentum=number(0, 1, "[)"))  # of `PMF`'s own arguments (`Method` checks the rest)


@register_method("pmf")
class PMF(Method):
    """Full meta-tuning with a ProtoNet loss.

    Args:
        backbone: a timm ViT.
        lr: peak SGD learning rate of the backbone, the scale and the bias.
        momentum: SGD momentum.
        tasks_per_step, warmup_fraction, min_lr: see `Method`.
    """

    rules = {**Method.rules, **RULES}

    def __init__(self, backbone, lr=5e-4, momentum=0.9, tasks_per_step=8, warmup_fraction=0.05, min_lr=1e-6):
        check(self.name, locals(), RULES)
        super().__init__(backbone, tasks_per_step, warmup_fraction, min_lr)
        self.lr, self.momentum = lr, momentum
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def parameter_groups(self):
        params = list(self.backbone.parameters()) + [self.scale, self.bias]
        return [(torch.optim.SGD, [dict(params=params, lr=self.lr, momentum=self.momentum, weight_decay=0.0)], None)]

    def task_loss(self, task):
        params = self.pretrained_params()  # the backbone's live (trainable) parameters
        support, query = support_query_features(partial(forward_features, self.backbone, params),
                                                task.support_x, task.query_x)
        logits = cosine_logits(query, prototypes(support, task.support_y, task.ways), self.scale, self.bias)
        return F.cross_entropy(logits, task.query_y), query_metrics(logits, task.query_y)

    def task_model(self, support_x, support_y, ways):
        params = {name: p.detach() for name, p in self.backbone.named_parameters()}
        return TaskModel(self.backbone, params, self.scale.item(), self.bias.item()).fit(support_x, support_y, ways)
