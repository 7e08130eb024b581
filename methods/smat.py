"""SMAT: sparse interpolated experts (Chen et al., ICML 2024; paper §4, Eq. 1–2, Alg. 1).

Per task T_i = (support, query):

1. α_i = normalised Gumbel-sigmoid of h_ζ(prototypes of θ_pre's support features) (`methods.router`);
2. z_m ~ hard concrete(φ_m) for m = 1..M (`methods.experts`), sampled once per meta-training step and
   shared by the step's tasks (`methods.experts.StepExperts`), so its N × M cost is paid once per step;
3. θ_i = θ_pre + δ ⊙ Σ_m α_{i,m} z_m, evaluated functionally (Eq. 1 with shared δ, zero-initialised);
4. prototypes of f_{θ_i}(support); student query logits 10·cos(f_{θ_i}(x_q), c_k);
5. dense teacher: θ_tr = stopgrad(θ_i) (prototypes included) after K SGD steps on the query CE;
6. L_i = β·CE(student) + (1 − β)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton KD);
7. sparsity (Eq. 2, Alg. 1): with ρ_m = Σ_j P(z_mj ≠ 0) / N the expected density of expert m and ᾱ_m
   the batch-mean routing weight, the constraint 1 − L0(z_m)/N ≥ τ enters the loss as
   λ_m ᾱ_m (ρ_m − (1 − τ)) (gradient to φ only; the ᾱ_m weight is the official code's, Eq. 2 has
   none); after each batch (Alg. 1's order: the step's penalty uses the λ of the batch before), with
   s_m the sparsity of the evaluation masks, λ_m ← λ_m + η_λ ᾱ_m (τ − s_m) while s_m < τ and λ_m ← 0
   once it holds. log α takes the official optimizer: SGD at lr 1e6 on gradients clipped to norm 5,
   then clamped into [ln 0.01, ln 100]. So the task loss moves each gate as the official code does
   (the penalty alone would pull every log α down evenly), the gates end up near 0 or 1, and the
   masks used at meta-test have sparsity τ.

Departures from the official code (github.com/szc12153/sparse_meta_tuning @302a914), deliberately:
the router keys, skill tokens and λ are registered, trained and checkpointed (HEAD does neither);
the KD is Hinton's KL(teacher ‖ student) as in the paper (the code uses the reverse KL and adds a KD
term towards the pre-trained model); the hard-concrete noise is real (the code's u ∈ 0.5 ± 1e-6
makes the masks deterministic), so the dual ascent counts the zeros of the evaluation masks (the
code counts its noise-free training masks, β = 2/3); the λ update has no learning-rate schedule; the
temperature anneals over a fraction of the run rather than a fixed 18k tasks. The code's extra
first-order support-set step before the query loss (lr 1e-3) is available as ``support_step_lr``,
off by default. Learning rates follow a warm-up + cosine schedule over the run.

Ablations of Table 2 are data, `VARIANTS`: each is a set of constructor overrides, selected by
``variant`` and recorded in result rows.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmark.checks import FLAG, check, configurable, integer, number, one_of, optional
from methods._registry import register_method
from methods.backbones import grad_keeping_graph
from methods.base import (Method, TaskModel, cosine_logits, forward_features, inference_features, prototypes,
                          query_metrics, support_query_features)
from methods.experts import ExpertDeltas, HardConcreteMasks, StepExperts, expert_parameter_names, gated_update
from methods.router import PrototypeRouter, gumbel_sigmoid_weights

__all__ = ["SMAT", "VARIANTS"]

VARIANTS = {  # Table 2 rows 1–5 (row 6 is PMF)
    "default": {},
    "no_dense_teacher": dict(dense_teacher=False),  # row 2
    "no_interpolated_experts": dict(interpolated_experts=False),  # row 3: one dense delta per expert
    "no_meta_split": dict(meta_split=False),  # row 4: no support/query split
    "mlp_experts": dict(learned_sparsity=False, interpolated_experts=False),  # row 5: fixed MLP experts
}
SWITCHES = ("learned_sparsity", "interpolated_experts", "meta_split", "dense_teacher")  # Table 2's components
RULES = dict(  # of `SMAT`'s own arguments (`Method` checks the rest)
    variant=one_of(*VARIANTS), num_experts=integer(1), target_sparsity=number(0, 1, "[)"), ce_weight=number(0, 1),
    kd_temperature=number(0, ends="(]"), teacher_steps=integer(0), teacher_lr=number(0),
    support_step_lr=optional(number(0)), **dict.fromkeys(SWITCHES, FLAG), delta_lr=number(0),
    delta_momentum=number(0, 1, "[)"), delta_weight_decay=number(0), mask_lr=number(0),
    mask_clip=optional(number(0, ends="(]")), lagrangian_lr=number(0), router_lr=number(0),
    router_weight_decay=number(0), router_clip=optional(number(0, ends="(]")),
    temperature_start=number(0, ends="(]"), temperature_end=number(0, ends="(]"),
    temperature_anneal_fraction=number(0, 1), mask_init_std=number(0), routing_logit_l2=number(0),
    sparsity_measure=one_of("l0", "expected"),
)


def variant_of(switches):
    """The name of the `VARIANTS` row with these component ``switches`` ({switch: on}), so that a run
    binding a switch itself is named (and tabled) as the ablation it is; a combination no row has is
    named by the switches that are off, e.g. ``no_meta_split+no_dense_teacher``."""
    for name, overrides in VARIANTS.items():
        if switches == {**dict.fromkeys(SWITCHES, True), **overrides}:
            return name
    return "+".join(f"no_{switch}" for switch in SWITCHES if not switches[switch])


@configurable("dense_teacher", "methods", reuse_query_pass=FLAG)
def teacher_reuses_query_pass(reuse_query_pass=False):
    """The fast-path switch ``dense_teacher.reuse_query_pass``: True, the student passes the support and
    the query separately and the dense teacher's first step goes back through the student's query pass
    instead of passing the query itself (`SMAT._teacher_logits`): the same gradient, one forward pass
    over the query fewer per task, one more backward graph. Off until ``python -m benchmark.perf step``
    has timed it on a GPU."""
    return reuse_query_pass


def distillation_loss(student_logits, teacher_logits, temperature):
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over examples (Hinton et al., 2015)."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
        log_target=True, reduction="batchmean",
    ) * temperature**2


@register_method("smat")
class SMAT(Method):
    """Sparse interpolated experts over every backbone tensor, routed per task.

    Args:
        backbone: a timm ViT; its parameters are θ_pre and stay frozen.
        variant: a key of `VARIANTS`; its overrides replace the arguments below. The model's ``variant``
            is named by the switches it ends with (`variant_of`), however they were set.
        num_experts: M.
        target_sparsity: τ, the sparsity every expert must reach (as ``sparsity_measure`` counts it).
        ce_weight: β of L = β·CE + (1 − β)·KD.
        kd_temperature: T of the distillation.
        teacher_steps, teacher_lr: K and the SGD step of the dense teacher.
        support_step_lr: if set, the official code's first-order SGD step on the support CE before the
            query loss (its value there: 1e-3); None (default) follows the paper.
        learned_sparsity: False: no masks or sparsity constraint; experts sit on the MLP layers only.
        interpolated_experts: False: each expert owns its dense delta instead of sharing δ.
        meta_split: False: support and query are pooled (routing, prototypes and loss on the whole task).
        dense_teacher: False: L = CE.
        delta_lr, delta_momentum, delta_weight_decay: SGD on δ (official: 1e-4, 0.9, 1e-4).
        mask_lr, mask_clip: SGD on log α and the norm its gradient is clipped to (official: 1e6, 5; set
            for ViT-S's N ≈ 2.2e7 gated elements per expert).
        lagrangian_lr: η_λ of the dual ascent (official: 2e-3, over 12.5k meta-updates). A run of far fewer
            meta-updates needs λ to rise faster (`benchmark/setups/md_mini.gin`: 2 for its 150).
        sparsity_measure: what the dual ascent compares with τ: ``l0`` (the exact zeros of the evaluation
            masks, the constraint of Eq. 2, counted as the official code does) or ``expected`` (1 − ρ_m,
            the comment of Alg. 1; gates held near ln 0.01 still count 0.05 there, so the evaluation
            masks end sparser than τ).
        router_lr, router_weight_decay, router_clip: AdamW on h_ζ and its gradient-norm clip.
        temperature_start, temperature_end, temperature_anneal_fraction: the Gumbel-sigmoid temperature
            falls linearly from start to end over that fraction of the run (official: 5 -> 0.5 over 18k
            of 50k tasks), then stays.
        mask_init_std: std of the initial log α.
        routing_logit_l2: weight of the mean squared routing logit (official: 1e-4).
        tasks_per_step, warmup_fraction, min_lr: see `Method`.
    """

    rules = {**Method.rules, **RULES}

    _transient = (*Method._transient, "_evaluation_gates")

    def __init__(self, backbone, variant="default", num_experts=8, target_sparsity=0.9, ce_weight=0.75,
                 kd_temperature=2.0, teacher_steps=1, teacher_lr=5e-3, support_step_lr=None, learned_sparsity=True,
                 interpolated_experts=True, meta_split=True, dense_teacher=True, delta_lr=1e-4, delta_momentum=0.9,
                 delta_weight_decay=1e-4, mask_lr=1e6, mask_clip=5.0, lagrangian_lr=2e-3, router_lr=1e-4,
                 router_weight_decay=1e-2, router_clip=1.0, temperature_start=5.0, temperature_end=0.5,
                 temperature_anneal_fraction=0.36, mask_init_std=0.5, routing_logit_l2=1e-4, sparsity_measure="l0",
                 tasks_per_step=4, warmup_fraction=0.2, min_lr=1e-6):
        check(self.name, locals(), RULES)
        super().__init__(backbone, tasks_per_step, warmup_fraction, min_lr)
        settings = {**locals(), **VARIANTS[variant]}
        settings["variant"] = variant_of({switch: settings[switch] for switch in SWITCHES})
        for key in ("variant", "target_sparsity", "ce_weight", "kd_temperature", "teacher_steps", "teacher_lr",
                    "support_step_lr", "learned_sparsity", "meta_split", "dense_teacher", "delta_lr",
                    "delta_momentum", "delta_weight_decay", "mask_lr", "mask_clip", "lagrangian_lr", "router_lr",
                    "router_weight_decay", "router_clip", "temperature_start", "temperature_end",
                    "temperature_anneal_fraction", "routing_logit_l2", "sparsity_measure"):
            setattr(self, key, settings[key])
        self.backbone.requires_grad_(False)
        names = expert_parameter_names(backbone, "all" if self.learned_sparsity else "mlp")
        self.deltas = ExpertDeltas(backbone, names, num_experts, shared=settings["interpolated_experts"])
        self.masks = HardConcreteMasks(self.deltas.layout.numel, num_experts, mask_init_std) if self.learned_sparsity else None
        self.router = PrototypeRouter(backbone.num_features, num_experts)
        self.register_buffer("lagrange_multipliers", torch.zeros(num_experts))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self._step_experts = None  # the current meta-training step's `StepExperts`
        self._evaluation_gates = None  # (state of log α, its evaluation gates)
        self._step_temperature = None  # the temperature during a meta-training step

    # --- the task model θ_i ------------------------------------------------------------------------

    def temperature(self):
        """Gumbel-sigmoid temperature at the current point of the run (read once per meta-training step)."""
        if self._step_temperature is not None:
            return self._step_temperature
        progress = float(self.steps) / max(int(self.total_steps), 1)
        fraction = min(progress / max(self.temperature_anneal_fraction, 1e-12), 1.0)
        return self.temperature_start + (self.temperature_end - self.temperature_start) * fraction

    def routing(self, support_x, support_y, ways):
        """(routing logits ℓ, merging weights α) for a support set; θ_pre's features carry no gradient."""
        features = inference_features(self.backbone, self.pretrained_params(), support_x)
        logits = self.router(prototypes(features, support_y, ways)).float()
        return logits, gumbel_sigmoid_weights(logits, self.temperature(), self.training)

    def merged_params(self, alpha, training):
        """θ_i = θ_pre + merged experts, for merging weights ``alpha``."""
        if training and self._step_experts is not None:  # inside a meta-training step (`accumulate_gradients`)
            update = self._step_experts.update(alpha)
        elif self.masks is None:
            return self.deltas.merge(self.pretrained_params(), alpha)
        elif not training and not torch.is_grad_enabled():
            return self.deltas.merge(self.pretrained_params(), alpha, self.evaluation_gates())
        else:
            update = gated_update(self.deltas.delta, self.masks.log_alpha, alpha, training)
        return self.deltas.add_to(self.pretrained_params(), update)

    def evaluation_gates(self):
        """The deterministic gates Z of evaluation (no gradient), computed once per state of log α and kept."""
        log_alpha = self.masks.log_alpha
        state = (log_alpha.data_ptr(), log_alpha._version)  # an optimizer step or a load changes the version
        if self._evaluation_gates is None or self._evaluation_gates[0] != state:
            with torch.no_grad():
                self._evaluation_gates = (state, self.masks.sample(training=False))
        return self._evaluation_gates[1]

    def task_model(self, support_x, support_y, ways):
        self.eval()
        with torch.no_grad():
            _, alpha = self.routing(support_x, support_y, ways)
            params = self.merged_params(alpha, training=False)
        return TaskModel(self.backbone, params).fit(support_x, support_y, ways)

    def describe_task(self, support_x, support_y, ways):
        """The task's merging weights α (evaluation mode), for result rows and the routing dendrogram."""
        self.eval()
        with torch.no_grad():
            return {"routing_weights": self.routing(support_x, support_y, ways)[1].tolist()}

    def report(self):
        """Per expert: expected and exact (evaluation-mask) sparsity, λ; per tensor: exact density per expert;
        and the overlap (Jaccard index of the non-zero evaluation gates) between every pair of experts."""
        report = {"variant": self.variant, "target_sparsity": self.target_sparsity,
                  "lagrange_multipliers": self.lagrange_multipliers.tolist()}
        if self.masks is None:
            return {**report, "experts_on": self.deltas.names}
        with torch.no_grad():
            gates = self.evaluation_gates() > 0
            per_tensor = self.deltas.layout.split(gates)
            union = sum(g.reshape(-1, g.shape[-1]).float().t() @ g.reshape(-1, g.shape[-1]).float() for g in per_tensor)
            counts = union.diagonal()
            jaccard = union / (counts[:, None] + counts[None, :] - union).clamp_min(1)
            report.update(
                expected_sparsity=self.masks.expected_sparsity().tolist(),
                l0_sparsity=self.masks.l0_sparsity().tolist(),
                tensors={name: {"numel": g[..., 0].numel(), "density": g.reshape(-1, g.shape[-1]).float().mean(0).tolist()}
                         for name, g in zip(self.deltas.names, per_tensor)},
                overlap=jaccard.tolist(),
            )
        return report

    # --- meta-training -------------------------------------------------------------------------------

    def configure_training(self, total_steps):
        self.total_steps.fill_(total_steps)
        super().configure_training(total_steps)

    def parameter_groups(self):
        groups = [(torch.optim.SGD, [dict(params=list(self.deltas.parameters()), lr=self.delta_lr,
                                          momentum=self.delta_momentum, weight_decay=self.delta_weight_decay)], None)]
        if self.masks is not None:
            groups.append((torch.optim.SGD, [dict(params=list(self.masks.parameters()), lr=self.mask_lr)],
                           self.mask_clip))
        groups.append((torch.optim.AdamW, [dict(params=list(self.router.parameters()), lr=self.router_lr,
                                                weight_decay=self.router_weight_decay)], self.router_clip))
        return groups

    def task_loss(self, task):
        """L_i (steps 1–6) plus the routing-logit penalty. The sparsity penalty (step 7) is a term of the
        whole meta-training step, added once per step by `accumulate_gradients`."""
        support_x, support_y, query_x, query_y = task.support_x, task.support_y, task.query_x, task.query_y
        if not self.meta_split:
            support_x = query_x = torch.cat([support_x, query_x])
            support_y = query_y = torch.cat([support_y, query_y])
        routing_logits, alpha = self.routing(support_x, support_y, task.ways)
        params = self.merged_params(alpha, training=True)
        reuse = self.dense_teacher and teacher_reuses_query_pass()
        if self.support_step_lr:
            support = forward_features(self.backbone, params, support_x)
            params, head = self._support_step(params, support, prototypes(support, support_y, task.ways), support_y)
            query = forward_features(self.backbone, params, query_x)
        else:
            support, query = support_query_features(partial(forward_features, self.backbone, params), support_x, query_x,
                                                    joint=not reuse)
            head = prototypes(support, support_y, task.ways)
        student = cosine_logits(query, head)
        ce = F.cross_entropy(student, query_y)
        metrics = {"query_ce": ce.detach(), **query_metrics(student.detach(), query_y)}
        loss = ce
        if self.dense_teacher:
            teacher = self._teacher_logits(params, head, query_x, query_y, query if reuse else None)
            kd = distillation_loss(student, teacher, self.kd_temperature)
            loss = self.ce_weight * ce + (1 - self.ce_weight) * kd
            metrics.update(kd=kd.detach(), teacher_acc=query_metrics(teacher, query_y)["query_acc"])
        metrics["loss"] = loss.detach()  # the objective; the penalties are logged apart
        loss = loss + self.routing_logit_l2 * routing_logits.pow(2).mean()
        metrics.update({f"alpha_{m}": a for m, a in enumerate(alpha.detach())})
        return loss, metrics

    def accumulate_gradients(self, tasks, total_tasks):
        """The tasks' gradients with the experts built once for the step (`StepExperts`: one gate sample for
        all its tasks), then, in one backward, the experts' deferred gradient and the sparsity penalty

            Σ_m λ_m ᾱ_m (ρ_m − (1 − τ)),   ρ_m = Σ_j P(z_mj ≠ 0) / N,   ᾱ = Σ_i α_i / total_tasks (α detached),

        which equals the sum over the tasks of λ ⊙ α_i / total_tasks times the same slack.
        """
        self._evaluation_gates = None  # training changes log α; do not hold N × M stale gates meanwhile
        gates = self.masks.sample(training=True) if self.masks is not None else None
        if gates is None and self.deltas.shared:
            return super().accumulate_gradients(tasks, total_tasks)
        self._step_experts = step = StepExperts(self.deltas.delta, gates)
        try:
            metrics = super().accumulate_gradients(tasks, total_tasks)
        finally:
            self._step_experts = None
        penalty = None
        if self.masks is not None:
            slack = self.masks.expected_density() - (1 - self.target_sparsity)
            penalty = (self.lagrange_multipliers * step.alpha_sum() / total_tasks * slack).sum()
        step.backward(penalty)
        return metrics

    def _support_step(self, params, support, head, support_y):
        """The official code's first-order SGD step on the support CE, from the support features
        ``support`` = f_{θ_i}(x_s) and their prototypes ``head`` = c:

            g = ∇_{θ_i, c̃} CE(cos(f_{θ_i}(x_s), c̃), y_s) at c̃ = stopgrad(c),   θ' = θ_i − lr·g_θ,   c' = c − lr·g_c̃

        with g a constant (first order), so the query loss reaches θ_i through θ' and the support
        features through c' (the official ProtoMAML re-attach). The gradient goes back through the
        task's own support pass, whose graph is kept for the query loss. Tensors of θ_i without a
        gradient (θ_pre where no expert sits) are not stepped.
        """
        stepped = {n: p for n, p in params.items() if p.requires_grad}
        fixed_head = head.detach().requires_grad_()
        *grads, head_grad = grad_keeping_graph(F.cross_entropy(cosine_logits(support, fixed_head), support_y),
                                               [*stepped.values(), fixed_head])
        stepped = dict(zip(stepped, torch._foreach_add(list(stepped.values()), grads, alpha=-self.support_step_lr)))
        return {**params, **stepped}, head - self.support_step_lr * head_grad

    def _teacher_logits(self, params, head, query_x, query_y, query=None):
        """Query logits of the dense teacher: K SGD steps on the query CE from stopgrad(θ_i, prototypes).

        ``query``, the student's query features f_{θ_i}(x_q) with their graph, gives the first step's
        gradient ∇_{θ_i} CE(cos(f_{θ_i}(x_q), stopgrad c)) without a forward pass of its own: the
        values are the same, and the graph is kept for the student's backward. It serves when every
        tensor of θ_i has a gradient (experts on every tensor); otherwise, and without ``query``, the
        teacher passes the query itself.
        """
        teacher, teacher_head = params, head.detach().requires_grad_()
        if query is None or not all(p.requires_grad for p in params.values()):
            teacher, query = {n: p.detach().requires_grad_() for n, p in params.items()}, None
        for step in range(self.teacher_steps):
            reused = step == 0 and query is not None
            features = query if reused else forward_features(self.backbone, teacher, query_x)
            grad = grad_keeping_graph if reused else torch.autograd.grad
            grads = grad(F.cross_entropy(cosine_logits(features, teacher_head), query_y), [*teacher.values(), teacher_head])
            with torch.no_grad():
                stepped = torch._foreach_add(list(teacher.values()), grads[:-1], alpha=-self.teacher_lr)
                teacher = {n: p.requires_grad_() for n, p in zip(teacher, stepped)}
                teacher_head = (teacher_head - self.teacher_lr * grads[-1]).requires_grad_()
        with torch.no_grad():
            return cosine_logits(inference_features(self.backbone, teacher, query_x), teacher_head)

    def before_step(self, tasks, metrics):
        """Dual ascent on λ (Alg. 1): grow while an expert is too dense, weighted by its mean routing weight."""
        if self.masks is None:
            return None
        mean_alpha = torch.tensor([sum(m[f"alpha_{e}"] for m in metrics) / len(metrics)
                                   for e in range(len(self.lagrange_multipliers))], device=self.lagrange_multipliers.device)
        sparsity = self.masks.l0_sparsity() if self.sparsity_measure == "l0" else self.masks.expected_sparsity()
        violation = self.target_sparsity - sparsity
        grown = self.lagrange_multipliers + self.lagrangian_lr * mean_alpha * violation
        self.lagrange_multipliers.copy_(torch.where(violation > 0, grown, torch.zeros_like(grown)))
        extra = {f"sparsity_{m}": s for m, s in enumerate(sparsity.tolist())}
        extra.update({f"lambda_{m}": lam for m, lam in enumerate(self.lagrange_multipliers.tolist())})
        return extra

    def meta_train_step(self, tasks, total_tasks=None):
        self._step_temperature = self.temperature()  # the step counter lives on the device: read it once
        try:
            summary = super().meta_train_step(tasks, total_tasks)
        finally:
            self._step_temperature = None
        if self.masks is not None:
            self.masks.clamp_()
        summary["temperature"] = self.temperature()
        return summary
