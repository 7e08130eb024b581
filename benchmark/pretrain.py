"""Deterministic supervised pre-training of a small backbone on a benchmark's pretrain sources, cached.

The embedded mini benchmark has no hub weights for its tiny ViT, so that Pre would otherwise be a
random network. `pretrained_weights` trains it with a linear classifier and cross-entropy on every
image of the benchmark's ``pretrain_sources`` (classes no meta-training or test episode uses), with
fixed seeds, one thread and a fixed image order, so the same inputs give the same weights. The
weights are saved as ``safetensors`` under the records cache, keyed by a hash of everything that
determines them, and later runs load them through timm's ``weights_file`` path.

Recipe: AdamW (lr 1e-3, weight decay 0.05), batch 64, ``steps`` steps with a cosine schedule, the
benchmark's preprocessing plus random horizontal flips.
"""

import dataclasses
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from methods.backbones import create_backbone

__all__ = ["pretrained_weights"]

RECIPE = dict(lr=1e-3, weight_decay=0.05, batch_size=64, seed=0)


def _images(data):
    """(images N×3×s×s, labels) of every record of the pretrain sources, classes numbered across sources."""
    images, labels, offset = [], [], 0
    for source in data.benchmark.pretrain_sources:
        records = data.source(source.name)
        for class_id in range(records.spec.num_classes):
            n = records.spec.get_total_images_per_class(class_id)
            images.append(records.images(class_id, range(n)))
            labels += [offset + class_id] * n
        offset += records.spec.num_classes
    return torch.cat(images), torch.tensor(labels)


def pretrained_weights(data, backbone_name, steps):
    """Path of the cached pre-trained weights of ``backbone_name`` on ``data``'s pretrain sources (trained if missing)."""
    sources = [s.name for s in data.benchmark.pretrain_sources]
    if not sources:
        raise ValueError(f"benchmark '{data.benchmark.name}' has no pretrain_sources to pre-train {backbone_name} on")
    preprocess = [dataclasses.asdict(data.source(name).preprocess) for name in sources]  # what the images look like
    key = json.dumps(dict(backbone=backbone_name, sources=sources, preprocess=preprocess, steps=steps,
                          root=str(data.records_root), **RECIPE), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = Path(data.records_root) / "backbones" / f"{backbone_name}-pretrain-{digest}.safetensors"
    if path.exists():
        return path
    print(f"pre-training {backbone_name} on {', '.join(sources)} for {steps} steps (once; cached at {path})",
          file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same weights on every machine of this kind
    try:
        state = _train(data, backbone_name, steps)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across nodes and processes
    try:
        save_file(state, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; a shared records root needs the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask():
    """The process's file-creation mask: from ``/proc/self/status`` where there is one (``os.umask`` can only
    read it by setting it, which for an instant changes it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _train(data, backbone_name, steps):
    images, labels = _images(data)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng():
        torch.manual_seed(RECIPE["seed"])
        backbone = create_backbone(backbone_name, pretrained=False)
        classifier = torch.nn.Linear(backbone.num_features, int(labels.max()) + 1)
    params = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    backbone.train()
    for _ in tqdm(range(steps), desc=f"pre-training {backbone_name}", file=sys.stderr, mininterval=5):
        batch = torch.randint(len(images), (RECIPE["batch_size"],), generator=generator)
        x = images[batch]
        flip = torch.rand(len(batch), generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = F.cross_entropy(classifier(backbone(x)), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return {name: p.detach().contiguous() for name, p in backbone.state_dict().items()}
