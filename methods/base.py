"""The `Method` contract every method implements, the `Task` it learns from and the `TaskModel` it predicts with.

The runner talks to every method through four calls:

* ``configure_training(total_steps)`` builds the optimizers and learning-rate schedules for a run of
  ``total_steps`` meta-updates (methods that do not train, like Pre, have nothing to build);
* ``meta_train_step(tasks)`` takes one meta-update on a batch of `Task` s and returns scalar metrics;
* ``task_model(support_x, support_y, ways)`` returns a `TaskModel`: the task-specific parameters
  θ_i and a cosine ProtoNet head fitted on the support set; meta-test adapters fine-tune it or not;
* ``state_dict()`` / ``training_state()`` (and their ``load_*``) hold everything a checkpoint needs.

A subclass provides ``task_loss(task)`` (the per-task meta-objective) and ``parameter_groups()``
(which optimizer trains which tensors, with which hyper-parameters); the base class runs the
accumulate-over-tasks / clip / step / schedule loop. The cosine ProtoNet head is

    logits_{q,k} = s · (cos(f(x_q), c_k) + b),   c_k = mean_{j: y_j = k} f(x_j),

with s = 10, b = 0 unless a method learns them (PMF).
"""

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch.func import functional_call

from benchmark.checks import FLAG, check, configurable, integer, number, optional
from benchmark.distributed import gather_objects, sum_gradients
from methods.backbones import compiled_functional, compiles, load_parameters, working_copy

__all__ = ["Method", "Task", "TaskModel", "prototypes", "cosine_logits", "autocast", "forward_features",
           "inference_features", "query_metrics", "read_metrics", "support_query_features"]


@dataclass
class Task:
    """One few-shot task on a device: labelled support and query images, labels in ``0..ways−1``."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int

    @classmethod
    def from_episode(cls, episode, device="cpu"):
        """The task of a `benchmark.episodes.Episode`, its images normalised on ``device``."""
        support_x, query_x = episode.inputs(device)
        support_y, query_y = (y.to(device, non_blocking=True) for y in (episode.support_labels, episode.query_labels))
        return cls(support_x, support_y, query_x, query_y, episode.ways)


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere (CPU bf16 is slower than fp32 here)."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@configurable("differentiable", "methods", compile_backbone=optional(FLAG))
def forward_features(backbone, params, x, compile_backbone=False):
    """CLS features of ``x`` under parameters ``params`` (a name -> tensor dict) of ``backbone``, in fp32,
    with gradients into ``params``: the forward pass of meta-training and of fine-tuning through θ_i.

    ``compile_backbone`` runs ``backbone`` through `torch.compile` (`methods.backbones.compiled_functional`):
    fused kernels for the forward and the backward instead of one per operator, the same gradients.
    Off by default (True/None opt in; None compiles on CUDA GPUs, `methods.backbones.compiles`) until
    ``python -m benchmark.perf step`` has timed it on a GPU.
    """
    if compiles(compile_backbone, x.device):
        return compiled_functional(backbone)(params, x).float()
    return functional_call(backbone, params, (x,)).float()


@configurable("inference", "methods", compile_backbone=optional(FLAG))
def inference_features(backbone, params, x, compile_backbone=None):
    """`forward_features` without gradient, under `autocast`: the forward pass of prediction and routing.

    ``compile_backbone`` (None: on CUDA, `methods.backbones.compiles`) loads ``params`` into a working
    copy of ``backbone`` (`methods.backbones.working_copy`, one foreach copy; in ``backbone``'s
    train/eval mode) and runs it through `torch.compile`, which fuses the pass's elementwise kernels;
    otherwise ``backbone`` is called functionally with ``params``.
    """
    with torch.no_grad(), autocast(x.device):
        if not compiles(compile_backbone, x.device):
            return forward_features(backbone, params, x, compile_backbone=False)
        work, compiled = working_copy(backbone, "inference", x.device)
        load_parameters(work.train(backbone.training), params)
        return compiled(x).float()


def prototypes(features, labels, ways):
    """Class means of ``features`` (``N × D``): row k is the mean over the examples labelled k."""
    one_hot = F.one_hot(labels, ways).to(features.dtype)
    return one_hot.t() @ features / one_hot.sum(0).clamp_min(1).unsqueeze(1)


def cosine_logits(features, class_prototypes, scale=10.0, bias=0.0):
    """s · (cos(f, c_k) + b) for every row of ``features`` and every prototype."""
    cos = F.normalize(features, dim=-1, eps=1e-12) @ F.normalize(class_prototypes, dim=-1, eps=1e-12).t()
    return scale * (cos + bias)


def support_query_features(features_of, support_x, query_x, joint=True):
    """(support features, query features) from one forward pass over both sets (``joint``) or one each.

    ``features_of(x)`` maps a batch to features; when ``query_x is support_x`` (no meta split) the
    batch is passed once and both results are the same tensor. Separate passes keep the query's
    graph apart, so a gradient of the query features alone costs a backward over the query alone.
    """
    if query_x is support_x:
        features = features_of(support_x)
        return features, features
    if not joint:
        return features_of(support_x), features_of(query_x)
    features = features_of(torch.cat([support_x, query_x]))
    return features[: len(support_x)], features[len(support_x):]


class TaskModel:
    """A task-specific model: backbone parameters θ_i (a dict for ``functional_call``) and a ProtoNet head.

    `fit` records the support set; the first `logits` call computes the prototypes in the same forward
    pass as its queries (support and query in one batch), so a ProtoNet prediction costs one pass.

    Args:
        backbone: the timm module whose parameter names ``params`` uses.
        params: name -> tensor, the task's θ_i.
        scale, bias: the cosine head's s and b.
    """

    def __init__(self, backbone, params, scale=10.0, bias=0.0):
        self.backbone, self.params, self.scale, self.bias = backbone, params, scale, bias
        self._support = None
        self._prototypes = None

    @property
    def device(self):
        return next(iter(self.params.values())).device

    def features(self, x):
        return inference_features(self.backbone, self.params, x)

    def fit(self, support_x, support_y, ways):
        """Set the ProtoNet head's support set; returns ``self``."""
        self._support, self._prototypes = (support_x, support_y, ways), None
        return self

    def logits(self, x):
        with torch.no_grad():
            if self._prototypes is None:
                support_x, support_y, ways = self._support
                support, query = support_query_features(self.features, support_x, x)
                self._prototypes = prototypes(support, support_y, ways)
            else:
                query = self.features(x)
            return cosine_logits(query, self._prototypes, self.scale, self.bias)

    def predict(self, x):
        return self.logits(x).argmax(-1)


RULES = dict(tasks_per_step=integer(1), warmup_fraction=number(0, 1), min_lr=number(0))  # of `Method`'s arguments


class Method(nn.Module):
    """Base class of every method. See the module docstring for the contract.

    Args:
        backbone: a timm ViT from `methods.backbones.create_backbone`.
        tasks_per_step: tasks whose gradients are averaged in one meta-update.
        warmup_fraction: share of the run spent warming the learning rates up from ``min_lr``.
        min_lr: first and last learning rate of the warm-up + cosine schedule.
    """

    name = None  # set by register_method
    trains = True  # False: no meta-training (the runner skips it)
    rules = RULES  # {argument: `benchmark.checks.Rule`} of the constructor, checked before a run is built

    def __init__(self, backbone, tasks_per_step=1, warmup_fraction=0.05, min_lr=1e-6):
        check(self.name, locals(), RULES)
        super().__init__()
        self.backbone = backbone
        self.tasks_per_step = tasks_per_step
        self.warmup_fraction = warmup_fraction
        self.min_lr = min_lr
        self.optimizers, self.schedulers, self._clip = [], [], []
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    _transient = ("optimizers", "schedulers", "_clip")  # meta-training's state, which a task's copy needs none of

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    def task_copy(self):
        """This method with its own copy of every learned tensor, for one task to fine-tune: the frozen
        backbone θ_pre is shared, and the `_transient` state (meta-training's optimizers and schedulers,
        caches the copy recomputes) is not copied: it is None in the copy."""
        memo = {id(self.backbone): self.backbone}
        memo.update((id(value), None) for name in self._transient if (value := getattr(self, name, None)) is not None)
        return copy.deepcopy(self, memo)

    def pretrained_params(self):
        """θ_pre: the backbone's own parameters, by name (no copies)."""
        return dict(self.backbone.named_parameters())

    # --- what a subclass provides -------------------------------------------------------------

    def parameter_groups(self):
        """[(optimizer class, [param group dicts], max grad norm or None)]: one entry per optimizer."""
        return []

    def task_loss(self, task):
        """(scalar loss, {metric: float or detached 0-dim tensor}) of one task; called under autocast.
        Tensors are read once per step for all tasks (`read_metrics`), so the host never waits mid-step."""
        raise NotImplementedError

    def before_step(self, tasks, metrics):
        """Hook after all task gradients are in, before the optimizers step (e.g. dual ascent).

        Returns extra metrics for the step (or None); ``metrics`` are the per-task ones.
        """

    def task_model(self, support_x, support_y, ways):
        raise NotImplementedError

    def describe_task(self, support_x, support_y, ways):
        """Extra fields for a task's result row (e.g. routing weights); none by default."""
        return {}

    def report(self):
        """A JSON-ready summary of the learned state for ``RUN_DIR/method_report.json``; none by default."""
        return {}

    # --- the shared training loop ---------------------------------------------------------------

    def configure_training(self, total_steps):
        """Build the optimizers and a per-step warm-up + cosine schedule for ``total_steps`` updates."""
        self.optimizers, self._clip = [], []
        for optimizer_class, groups, max_norm in self.parameter_groups():
            self.optimizers.append(optimizer_class(groups))
            self._clip.append(max_norm)
        warmup = int(self.warmup_fraction * total_steps)
        self.schedulers = [
            CosineLRScheduler(opt, t_initial=max(total_steps, 1), lr_min=self.min_lr, warmup_t=warmup,
                              warmup_lr_init=self.min_lr, t_in_epochs=False)
            for opt in self.optimizers
        ]
        for scheduler in self.schedulers:
            scheduler.step_update(int(self.steps))

    def meta_train_step(self, tasks, total_tasks=None):
        """One meta-update: mean of the task losses, gradient clipping per optimizer, step, schedule.

        With several processes (`benchmark.distributed`), ``tasks`` is this process's share of the
        update's ``total_tasks``; gradients are summed and metrics gathered across processes, so the
        update equals that of one process given all the tasks.
        """
        if not self.optimizers:
            raise RuntimeError(f"{self.name}: call configure_training(total_steps) before meta_train_step")
        self.train()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        metrics = read_metrics(self.accumulate_gradients(tasks, total_tasks or len(tasks)))
        sum_gradients([p for optimizer in self.optimizers for group in optimizer.param_groups for p in group["params"]])
        metrics = [m for share in gather_objects(metrics) for m in share]
        extra = self.before_step(tasks, metrics) or {}
        for optimizer, max_norm in zip(self.optimizers, self._clip):
            if max_norm is not None:
                params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
        self.steps += 1
        for scheduler in self.schedulers:
            scheduler.step_update(int(self.steps))
        summary = {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}
        summary.update(extra, lr=self.optimizers[0].param_groups[0]["lr"])
        return summary

    def end_training(self):
        """Free what only meta-training holds (the last step's gradients, optimizer and scheduler state),
        so that meta-testing runs in the same memory whether the method was trained in this process or
        loaded from a checkpoint. `configure_training` builds the optimizers anew."""
        for p in self.parameters():
            p.grad = None
        self.optimizers, self.schedulers, self._clip = [], [], []

    def accumulate_gradients(self, tasks, total_tasks):
        """Add ∇(L_i / ``total_tasks``) of every task to the parameters' ``.grad``, one backward per task
        (so one task's activations are alive at a time); returns the tasks' metrics (values as `task_loss`)."""
        metrics = []
        for task in tasks:
            with autocast(self.device):
                loss, task_metrics = self.task_loss(task)
            (loss / total_tasks).backward()
            metrics.append({"loss": loss.detach(), **task_metrics})
        return metrics

    def training_state(self):
        """Optimizer and scheduler states (the parameters themselves are in ``state_dict()``)."""
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_training_state(self, state):
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)


def query_metrics(logits, labels):
    """{'query_acc': accuracy (a 0-dim tensor)} of ``logits`` against ``labels``."""
    return {"query_acc": (logits.argmax(-1) == labels).float().mean()}


def read_metrics(metrics):
    """``metrics`` (a list of {name: float or 0-dim tensor}) with every tensor read as a float in one
    device-to-host copy: one wait for the device per step instead of one per value."""
    tensors = [v for m in metrics for v in m.values() if torch.is_tensor(v)]
    values = iter(torch.stack([t.detach().float() for t in tensors]).tolist() if tensors else [])
    return [{k: next(values) if torch.is_tensor(v) else v for k, v in m.items()} for m in metrics]
