"""``python -m benchmark.perf``: performance figures, measured on this machine, never asserted in tests.

* ``data``: episodes/s of decoded episode assembly from records;
* ``adapters``: seconds and peak GPU memory per task of the meta-test adapters on one synthetic
  real-size episode (Table 5 of the paper beside, with the ratio);
* ``step``: a SMAT meta-training step against a PMF step on the same tasks.

``data`` reports episodes/s and images/s for assembling whole episodes (description, record reads, JPEG
decode, resize, normalise) through the same `DataLoader` path that training and evaluation use,
for two inputs:

* ``mini``: the embedded mini benchmark (32 px), every test source;
* ``md``: a generated Meta-Dataset-sized source (JPEGs of ``--image-px`` pixels, default 320×240,
  resized to 128 px), sampled with the official variable-way/shot config, so episodes hold up to
  500 support and 10 query images per class, as on real Meta-Dataset sources.

Figures are printed, never asserted: performance claims live here, not in tests.

``adapters`` and ``step`` build the backbone with random weights (timing does not depend on them) and
use synthetic episodes already on the device, so they measure compute alone; bf16 autocast on CUDA.
Each prints a table and, with ``--json FILE``, writes the figures with the device name.

Example:
    python -m benchmark.perf data --workers 0 2 --episodes 20
    python -m benchmark.perf adapters --json adapters.json     # on a GPU: the Table 5 figures
    python -m benchmark.perf step --json step.json
"""

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmark.episodes import BenchmarkData, episode_loader
from benchmark.records import encode_example, write_records
from registry.catalog import Benchmark, Source
from registry.dataset_spec import DatasetSpecification, Split, dump_dataset_spec
from registry.errors import exit_on_error

PROG = "python -m benchmark.perf"


def write_md_sized_source(root, num_classes, images_per_class, width, height, seed=0):
    """A flat TEST-only source of smooth random colour images saved as JPEG (quality 90) under ``root/perf_md``.

    Each image is a 6×8 random colour field bilinearly upsampled to ``width × height``, which gives
    JPEG sizes (≈ 10–20 KB) and decode costs close to natural photographs of that size.
    """
    directory = Path(root) / "perf_md"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for class_id in tqdm(range(num_classes), desc="writing perf_md", file=sys.stderr, leave=False, disable=None):
        payloads = []
        for _ in range(images_per_class):
            field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            image = Image.fromarray(field).resize((width, height), Image.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            payloads.append(encode_example(buffer.getvalue(), class_id))
        write_records(directory / f"{class_id}.tfrecords", payloads)
    spec = DatasetSpecification(
        name="perf_md",
        classes_per_split={Split.TRAIN: 0, Split.VALID: 0, Split.TEST: num_classes},
        images_per_class={c: images_per_class for c in range(num_classes)},
        class_names={c: f"class_{c}" for c in range(num_classes)},
        path=str(directory),
    )
    dump_dataset_spec(spec, directory)
    source = Source("perf_md", "ood", "flat", {"train": 0, "valid": 0, "test": num_classes}, 128,
                    "center_crop", "imagenet", "generated", "generated Meta-Dataset-sized source")
    return Benchmark("perf_md", "data-pipeline benchmark", "user", (), (), (source,), (), 0, 0, 0, "paper")


def time_episodes(data, source, num_episodes, workers):
    """(seconds, episodes, images) to assemble ``num_episodes`` test episodes of ``source``."""
    episodes = data.eval_episodes(source, "test", num_episodes=num_episodes)
    images = 0
    start = time.perf_counter()
    for episode in tqdm(episode_loader(episodes, workers), total=num_episodes, desc=f"{source} w={workers}",
                        file=sys.stderr, leave=False, disable=None):
        images += len(episode.support_images) + len(episode.query_images)
    return time.perf_counter() - start, num_episodes, images


def report(label, seconds, episodes, images):
    print(f"{label:<40} {episodes / seconds:8.2f} episodes/s {images / seconds:9.0f} images/s "
          f"({episodes} episodes, {images} images, {seconds:.1f} s)")


def run_data(args):
    import torch

    torch.set_num_threads(1)  # one core per loader process, so worker counts compare fairly
    print(f"# data pipeline on {torch.get_num_threads()} torch thread(s) per process, "
          f"{len(__import__('os').sched_getaffinity(0))} CPU core(s)")
    if "mini" in args.inputs:
        data = BenchmarkData("md_mini")
        for workers in args.workers:
            timings = [time_episodes(data, s.name, args.episodes, workers) for s in data.benchmark.test_sources]
            report(f"md_mini (all test sources, 32 px) w={workers}", *map(sum, zip(*timings)))
    if "md" in args.inputs:
        with tempfile.TemporaryDirectory(prefix="smat-perf-") as tmp:
            width, height = args.image_px
            benchmark = write_md_sized_source(tmp, args.classes, args.images_per_class, width, height)
            data = BenchmarkData(benchmark, tmp)
            for workers in args.workers:
                report(f"perf_md ({width}x{height} JPEG -> 128 px) w={workers}",
                       *time_episodes(data, "perf_md", args.episodes, workers))


PAPER_TABLE5 = {"protonet": (0.2, 4332), "gradient_free": (6.4, 4332), "full": (11.8, 17264)}  # s/task, MiB


def _synthetic_task(ways, support, query, size, device, seed=0):
    from methods import Task
    import torch

    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randn(n, 3, size, size, generator=g).to(device)  # noqa: E731
    labels = lambda n: (torch.arange(n) % ways).to(device)  # noqa: E731
    return Task(images(support), labels(support), images(query), labels(query), ways)


def _timed(fn, device, repeats):
    """(median seconds, peak MiB or None) of ``fn()`` after one warm-up call."""
    import statistics
    import torch

    fn()
    cuda = torch.device(device).type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), (torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)


def _device(args):
    import torch

    return torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def _device_label(device):
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _write_json(path, payload):
    if path:
        Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True))
        print(f"wrote {path}")


def run_adapters(args):
    """Seconds and peak memory per task of protonet, gradient_free (≈50 evaluations) and full (50 steps)."""
    import torch

    from methods import create_backbone, create_method
    from methods.adapters import get_adapter, seeded_generator

    device = _device(args)
    torch.manual_seed(0)
    smat = create_method("smat", backbone=create_backbone(args.backbone, pretrained=False)).to(device)
    task = _synthetic_task(args.ways, args.support, args.query, args.image_size, device)
    figures = {}
    print(f"# adapters on {_device_label(device)}: {args.backbone}, {args.ways}-way, {args.support} support + "
          f"{args.query} query at {args.image_size} px")
    print(f"{'adapter':<16}{'s/task':>10}{'paper':>8}{'ratio':>8}{'peak MiB':>10}{'paper':>8}")
    for name in args.adapters:
        adapter = get_adapter(name, smat)
        seconds, peak = _timed(lambda: adapter(smat, task, 1e-4, seeded_generator(name)), device, args.repeats)
        paper_s, paper_mib = PAPER_TABLE5.get(name, (None, None))
        figures[name] = dict(seconds=seconds, peak_memory_mib=peak, paper_seconds=paper_s, paper_memory_mib=paper_mib)
        ratio = f"{paper_s / seconds:7.1f}x" if paper_s else "      -"
        print(f"{name:<16}{seconds:>10.3f}{paper_s or '-':>8}{ratio:>8}{peak or '-':>10}{paper_mib or '-':>8}")
    _write_json(args.json, dict(device=_device_label(device), backbone=args.backbone, ways=args.ways,
                                support=args.support, query=args.query, image_size=args.image_size, adapters=figures))


def run_step(args):
    """One SMAT meta-training step against one PMF step on the same tasks (the ratio the issue bounds by 2)."""
    import torch

    from methods import create_backbone, create_method

    device = _device(args)
    tasks = [_synthetic_task(args.ways, args.support, args.query, args.image_size, device, seed=i)
             for i in range(args.tasks)]
    figures = {}
    for name in ("pmf", "smat"):
        torch.manual_seed(0)
        method = create_method(name, backbone=create_backbone(args.backbone, pretrained=False),
                               tasks_per_step=args.tasks).to(device)
        method.configure_training(10 * args.repeats + 10)
        seconds, peak = _timed(lambda: method.meta_train_step(tasks), device, args.repeats)
        figures[name] = dict(seconds=seconds, peak_memory_mib=peak)
        print(f"{name:<6} step {seconds:8.3f} s  peak {peak or '-'} MiB")
    ratio = figures["smat"]["seconds"] / figures["pmf"]["seconds"]
    print(f"SMAT step / PMF step = {ratio:.2f} (target <= 2.0) on {_device_label(device)}")
    _write_json(args.json, dict(device=_device_label(device), backbone=args.backbone, tasks=args.tasks,
                                support=args.support, query=args.query, image_size=args.image_size,
                                steps=figures, ratio=ratio))


def _compute_flags(parser, support, query):
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--support", type=int, default=support)
    parser.add_argument("--query", type=int, default=query)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="episodes/s of decoded episode assembly from records")
    data.add_argument("--inputs", nargs="+", choices=["mini", "md"], default=["mini", "md"])
    data.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader worker counts to time")
    data.add_argument("--episodes", type=int, default=10, help="episodes per source and worker count")
    data.add_argument("--classes", type=int, default=50, help="classes of the generated MD-sized source")
    data.add_argument("--images-per-class", type=int, default=120)
    data.add_argument("--image-px", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    adapters = commands.add_parser("adapters", help="s/task and peak memory of the meta-test adapters (Table 5)")
    _compute_flags(adapters, support=400, query=200)
    adapters.add_argument("--adapters", nargs="+", default=["protonet", "gradient_free", "full"])
    step = commands.add_parser("step", help="a SMAT meta-training step against a PMF step on the same tasks")
    _compute_flags(step, support=100, query=100)
    step.add_argument("--tasks", type=int, default=4)
    args = parser.parse_args(argv)
    with exit_on_error(PROG):
        {"data": run_data, "adapters": run_adapters, "step": run_step}[args.command](args)


if __name__ == "__main__":
    main()
