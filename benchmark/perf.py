"""``python -m benchmark.perf data``: how fast decoded episodes come out of the records, on this machine.

Reports episodes/s and images/s for assembling whole episodes (description, record reads, JPEG
decode, resize, normalise) through the same `DataLoader` path that training and evaluation use,
for two inputs:

* ``mini``: the embedded mini benchmark (32 px), every test source;
* ``md``: a generated Meta-Dataset-sized source (JPEGs of ``--image-px`` pixels, default 320×240,
  resized to 128 px), sampled with the official variable-way/shot config, so episodes hold up to
  500 support and 10 query images per class, as on real Meta-Dataset sources.

Figures are printed, never asserted: performance claims live here, not in tests.

Example:
    python -m benchmark.perf data --workers 0 2 --episodes 20
"""

import argparse
import io
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
    args = parser.parse_args(argv)
    with exit_on_error(PROG):
        run_data(args)


if __name__ == "__main__":
    main()
