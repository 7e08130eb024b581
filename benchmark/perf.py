"""``python -m benchmark.perf``: performance figures, measured on this machine, never asserted in tests.

* ``data``: episodes/s of episode assembly, decoding records and reading the decoded cache;
* ``adapters``: seconds and peak GPU memory per task of the meta-test adapters on one synthetic
  real-size episode, as Table 5: the paper's figure beside, their ratio, and the targets;
* ``step``: a SMAT meta-training step against a PMF step on the same tasks;
* ``activations``: MiB of activations full fine-tuning's forward pass keeps for its backward, per image,
  under each memory setting (compiled or not, activation memory budgets, gradient checkpointing) and
  bf16 autocast — the GPU's memory figure that any machine can measure;
* ``all``: data, adapters and step in one run and one JSON file (the targets' figures first) — the
  prepared script for a GPU machine.

``data`` reports episodes/s and images/s for assembling whole episodes (description, record reads, JPEG
decode, resize) through the same `DataLoader` path that training and evaluation use (normalisation
happens later, on the device, when an episode becomes a `methods.Task`),
from the records and from a decoded cache (`benchmark.cache`, built first; its build time is a row),
for two inputs:

* ``mini``: the embedded mini benchmark (32 px), every test source;
* ``md``: a generated Meta-Dataset-sized source (JPEGs of ``--image-px`` pixels, default 320×240,
  resized to 128 px), sampled with the official variable-way/shot config, so episodes hold up to
  500 support and 10 query images per class, as on real Meta-Dataset sources.

``adapters`` and ``step`` build the backbone with random weights (timing does not depend on them) and
use synthetic episodes already on the device, so they measure compute alone; bf16 autocast on CUDA.
Times are medians of ``--repeats`` calls after a warm-up; memory is the peak allocated by PyTorch.
Each prints a table and, with ``--json FILE``, writes the figures with the device name.

Example:
    python -m benchmark.perf data --workers 0 2 --episodes 20
    python -m benchmark.perf adapters --json adapters.json     # on a GPU: the Table 5 figures
    python -m benchmark.perf activations --images 16            # any machine: memory kept per image
    python -m benchmark.perf all --json perf.json
"""

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from benchmark.episodes import BenchmarkData, episode_loader
from benchmark.files import write_json
from benchmark.records import encode_example, write_records
from registry.catalog import Benchmark, Source, get_benchmark
from registry.dataset_spec import DatasetSpecification, Split, dump_dataset_spec
from registry.errors import CommandParser, DataError, exit_on_error

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
    """(seconds, episodes, images) of the steady state of assembling ``num_episodes`` test episodes of
    ``source``: the clock starts when the first episode arrives, and the episodes after it are counted,
    so starting the loader's worker processes is not timed."""
    episodes = data.eval_episodes(source, "test", num_episodes=num_episodes)
    images, start = 0, None
    for episode in tqdm(episode_loader(episodes, workers), total=num_episodes, desc=f"{source} w={workers}",
                        file=sys.stderr, leave=False, disable=None):
        if start is None:
            start = time.perf_counter()
        else:
            images += len(episode.support_labels) + len(episode.query_labels)
    return time.perf_counter() - start, num_episodes - 1, images


def measure_data(args, tmp, measured=lambda rows: None):
    """[{input, path, workers, episodes_per_s, images_per_s, ...}] for each input, with and without the cache
    (`time_episodes` per test source); ``measured(rows)`` is called after each row.

    The decoded cache of each input is built (``--workers`` processes, the largest count timed) into
    ``tmp`` first; its build time is reported as a row of its own.
    """
    from benchmark.cache import DecodedCache, build_source

    inputs = {}
    if "mini" in args.inputs:
        inputs["md_mini (all test sources, 32 px)"] = (get_benchmark("md_mini"), None)
    if "md" in args.inputs:
        width, height = args.image_px
        inputs[f"perf_md ({width}x{height} JPEG -> 128 px)"] = (
            write_md_sized_source(tmp, args.classes, args.images_per_class, width, height), tmp)
    rows = []
    for label, (benchmark, records_root) in inputs.items():
        plain = BenchmarkData(benchmark, records_root)
        cache = DecodedCache(Path(tmp) / "decoded", benchmark.name, plain.records_root)
        began = time.perf_counter()
        for records in plain.sources.values():  # a cached BenchmarkData needs every source it uses
            build_source(cache, records, workers=max(max(args.workers), 1))
        rows.append(dict(input=label, path="cache build (every source)", workers=max(max(args.workers), 1),
                         seconds=time.perf_counter() - began))
        measured(rows)
        cached = BenchmarkData(benchmark, records_root, decoded_cache=cache.root)
        for path, data in (("records", plain), ("decoded cache", cached)):
            for workers in args.workers:
                timings = [time_episodes(data, s.name, args.episodes, workers) for s in benchmark.test_sources]
                seconds, episodes, images = map(sum, zip(*timings))
                rows.append(dict(input=label, path=path, workers=workers, seconds=seconds, episodes=episodes,
                                 images=images, episodes_per_s=episodes / seconds, images_per_s=images / seconds))
                measured(rows)
    return rows


def data_table(rows):
    from tabulate import tabulate

    body = [[r["input"], r["path"], r["workers"], _cell(r.get("episodes_per_s"), ".2f"), _cell(r.get("images_per_s"), ".0f"),
             f"{r['seconds']:.1f}"] for r in rows]
    return tabulate(body, ["input", "path", "workers", "episodes/s", "images/s", "seconds"], tablefmt="github",
                    disable_numparse=True)


def _cpu_label():
    import torch

    return f"{os.cpu_count()} CPU cores ({len(os.sched_getaffinity(0))} usable), {torch.get_num_threads()} torch thread(s)"


def data_stage(args, measured=lambda rows: None):
    """(rows, CPU label): `measure_data` with one torch thread per loader process, so worker counts
    compare fairly (the thread count is restored after), its header and table printed."""
    import torch

    if args.episodes < 2:
        raise DataError(f"--episodes {args.episodes}: the clock starts at the first episode, so time at least 2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = _cpu_label()
        print(f"# data pipeline on {cpu} per process")
        with tempfile.TemporaryDirectory(prefix="smat-perf-") as tmp:
            rows = measure_data(args, tmp, measured)
    finally:
        torch.set_num_threads(threads)
    print(data_table(rows))
    return rows, cpu


def run_data(args):
    """Episodes/s from records and from the decoded cache, for each input and worker count."""
    rows, cpu = data_stage(args)
    _write_json(args.json, dict(device=cpu, what="data", episodes=args.episodes, rows=rows, **_provenance()))


PAPER_TABLE5 = {"protonet": (0.2, 4332), "gradient_free": (6.4, 4332), "full": (11.8, 17264)}  # s/task, MiB (FP16)
TARGETS = {"protonet": (0.02, None), "gradient_free": (0.6, None), "full": (1.5, 8000)}  # issue 9, one GPU
STEP_RATIO_TARGET = 2.0  # SMAT step ÷ PMF step on the same tasks


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


def _write_json(path, payload, quiet=False):
    """Write ``payload`` to ``path`` (if given) whole or not at all: a run stopped meanwhile keeps the last file."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, payload, sort_keys=True)
        if not quiet:
            print(f"wrote {path}")


def _cell(value, fmt):
    return "—" if value is None else format(value, fmt)


def _met(value, target):
    return "—" if value is None or target is None else ("yes" if value <= target else "no")


def table5(adapters):
    """Markdown Table 5: measured s/task and peak MiB beside the paper's, the speed-up and the issue's targets."""
    from tabulate import tabulate

    rows = []
    for name, f in adapters.items():
        target_s, target_mib = f["target_seconds"], f["target_memory_mib"]
        speedup = f["paper_seconds"] / f["seconds"] if f.get("paper_seconds") and f["seconds"] else None
        rows.append([name, _cell(f["seconds"], ".3f"), _cell(f.get("paper_seconds"), "g"), _cell(speedup, ".1f"),
                     _cell(target_s, "g"), _met(f["seconds"], target_s), _cell(f["peak_memory_mib"], ".0f"),
                     _cell(f.get("paper_memory_mib"), "d"), _cell(target_mib, "d"), _met(f["peak_memory_mib"], target_mib)])
    header = ["adapter", "s/task", "paper s/task", "paper ÷ ours", "target s", "met", "peak MiB", "paper MiB",
              "target MiB", "met"]
    failed = "".join(f"\n{label} FAILED: {adapters[label]['error']}" for label in failures(adapters))
    return tabulate(rows, header, tablefmt="github", disable_numparse=True) + failed


def _failure(figures):
    """``"  FAILED: <error>"`` for a variant that failed, else nothing."""
    return f"  FAILED: {figures['error']}" if figures.get("error") else ""


def print_forward(forward):
    print(f"plain bf16 forward of {forward['images']} images: {_cell(forward['images_per_second'], ',.0f')} images/s"
          + _failure(forward))


def exit_if_failed(*figures):
    """Exit 1 (after the figures were printed and written) when any measured variant failed."""
    failed = [label for f in figures for label in failures(f)]
    if failed:
        sys.exit(f"{PROG}: failed: {', '.join(failed)} (see the errors above)")


def _measured(label, fn, device, repeats):
    """``_timed(fn)`` as figures; a variant that fails is reported (``error``) and the others still run."""
    try:
        seconds, peak = _timed(fn, device, repeats)
        return dict(seconds=seconds, peak_memory_mib=peak)
    except Exception as error:  # noqa: BLE001 — one failing variant must not cost the other figures
        print(f"{PROG}: {label} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return dict(seconds=None, peak_memory_mib=None, error=f"{type(error).__name__}: {error}")


def failures(figures):
    """Labels of the variants in ``figures`` (label -> figures) that failed."""
    return [label for label, f in figures.items() if f.get("error")]


ADAPTER_VARIANTS = {  # label: (adapter, gin bindings): the default adapters with other settings, timed beside them
    "protonet_eager": ("protonet", {"inference.compile_backbone": False}),
    "gradient_free_eager": ("gradient_free", {"inference.compile_backbone": False}),
    "full_activation_budget_90": ("full", {"full.activation_memory_budget": 0.9}),
    "full_activation_budget_50": ("full", {"full.activation_memory_budget": 0.5}),
    "full_grad_checkpointing": ("full", {"full.grad_checkpointing": True}),
    "full_eager": ("full", {"full.compile_backbone": False}),
}
STEP_VARIANTS = {  # label: (method, gin bindings), timed beside the PMF and SMAT steps; the defaults to decide first
    "pmf_compiled_training": ("pmf", {"differentiable.compile_backbone": True}),
    "smat_compiled_training": ("smat", {"differentiable.compile_backbone": True}),
    "smat_teacher_reuse": ("smat", {"dense_teacher.reuse_query_pass": True}),
    "smat_compiled_training_teacher_reuse": ("smat", {"differentiable.compile_backbone": True,
                                                      "dense_teacher.reuse_query_pass": True}),
    "smat_eager_inference": ("smat", {"inference.compile_backbone": False}),
    "smat_eager_gates": ("smat", {"hard_concrete.compile_gates": False}),
    "smat_compiled_gates": ("smat", {"hard_concrete.compile_gates": True}),
}


def _variants(defaults, variants):
    """label -> (name, gin bindings): each of ``defaults`` unbound, then the ``variants`` of those names,
    whose bindings are parsed into a gin scope named by the label (entered by `_bound`)."""
    import gin

    chosen = {name: (name, {}) for name in defaults}
    chosen.update((label, v) for label, v in variants.items() if v[0] in defaults)
    with gin.unlock_config():
        gin.parse_config([f"{label}/{key} = {value!r}" for label, (_, bindings) in chosen.items()
                          for key, value in bindings.items()])
    return chosen


def _bound(label, bindings):
    """The gin scope of variant ``label`` (no scope at all for a default)."""
    import gin

    return gin.config_scope(label if bindings else None)


def measure_adapters(args, device, defaults=True, variants=True, measured=lambda figures: None):
    """{label: figures} of protonet, gradient_free (≈50 evaluations) and full (50 steps) on one episode
    (``defaults``), and of each with the settings of its `ADAPTER_VARIANTS` (``variants``: activation
    memory budgets of 90 % and 50 %, gradient checkpointing, `torch.compile` off). ``measured(figures)``
    is called after each row (to save what a time limit would otherwise lose)."""
    import torch

    from methods import create_backbone, create_method
    from methods.adapters import get_adapter, seeded_generator

    torch.manual_seed(0)
    smat = create_method("smat", backbone=create_backbone(args.backbone, pretrained=False)).to(device)
    task = _synthetic_task(args.ways, args.support, args.query, args.image_size, device)
    figures = {}
    chosen = {label: v for label, v in _variants(args.adapters, ADAPTER_VARIANTS).items()
              if (defaults if label in args.adapters else variants)}
    for label, (name, bindings) in tqdm(chosen.items(), desc="adapters", file=sys.stderr, leave=False, disable=None):
        adapter = get_adapter(name, smat)

        def adapt():
            with _bound(label, bindings):
                return adapter(smat, task, 1e-4, seeded_generator(name))

        paper_s, paper_mib = PAPER_TABLE5.get(name, (None, None))
        figures[label] = dict(**_measured(label, adapt, device, args.repeats), bindings=bindings,
                              paper_seconds=paper_s, paper_memory_mib=paper_mib,
                              target_seconds=TARGETS[name][0] if name in TARGETS else None,
                              target_memory_mib=TARGETS[name][1] if name in TARGETS else None)
        measured(figures)
    return figures


def measure_forward(args, device):
    """Images/s of one plain bf16 forward pass of the backbone over support + query (the compute scale)."""
    import torch

    from methods import create_backbone
    from methods.base import autocast

    backbone = create_backbone(args.backbone, pretrained=False).to(device).eval()
    images = _synthetic_task(args.ways, args.support, args.query, args.image_size, device)
    batch = torch.cat([images.support_x, images.query_x])

    def forward():
        with torch.no_grad(), autocast(device):
            backbone(batch)

    f = _measured("forward", forward, device, args.repeats)
    return dict(f, images=len(batch), images_per_second=len(batch) / f["seconds"] if f["seconds"] else None)


def measure_step(args, device, measured=lambda step: None):
    """``{"steps": {label: figures}, "ratio": SMAT ÷ PMF, "ratios": step_ratios}`` of one meta-training step
    of PMF, SMAT and the `STEP_VARIANTS` on the same tasks; each row is printed, and ``measured(step)``
    called, as soon as it is measured. With ``args.profile`` (a folder), one more step of each is
    profiled: ``step_<label>.txt`` there holds its operators by device time, and the figures its kernel
    count."""
    import torch

    from methods import create_backbone, create_method

    tasks = [_synthetic_task(args.ways, args.support, args.query, args.image_size, device, seed=i)
             for i in range(args.tasks)]
    figures = {}
    for label, (name, bindings) in _variants(["pmf", "smat"], STEP_VARIANTS).items():
        torch.manual_seed(0)
        method = create_method(name, backbone=create_backbone(args.backbone, pretrained=False),
                               tasks_per_step=args.tasks).to(device)
        method.configure_training(10 * args.repeats + 10)

        def step():
            with _bound(label, bindings):
                method.meta_train_step(tasks)

        figures[label] = dict(_measured(label, step, device, args.repeats), bindings=bindings)
        if args.profile and not figures[label].get("error"):
            try:
                figures[label]["kernels"] = _profile(step, device, Path(args.profile) / f"step_{label}.txt")
            except Exception as error:  # noqa: BLE001 — a profiler fault costs the profile, not the other rows
                print(f"{PROG}: profiling {label} failed: {type(error).__name__}: {error}", file=sys.stderr)
                figures[label]["profile_error"] = f"{type(error).__name__}: {error}"
        print(_step_row(label, figures[label]), flush=True)
        ratios = step_ratios(figures)
        step = dict(steps=figures, ratio=ratios.get("smat"), ratios=ratios)
        measured(step)
    return step


def step_ratios(figures):
    """{SMAT label: its seconds ÷ those of the PMF step with the same settings}: the PMF row with the
    most of the SMAT row's gin bindings and no others (the default PMF step for settings PMF has no
    variant of)."""
    pmf_rows = [f for label, f in figures.items() if label.startswith("pmf")]
    ratios = {}
    for label, f in figures.items():
        if label.startswith("smat"):
            shared = [p for p in pmf_rows if p["bindings"].items() <= f["bindings"].items()]
            pmf = max(shared, key=lambda p: len(p["bindings"]))["seconds"]
            ratios[label] = f["seconds"] / pmf if pmf and f["seconds"] else None
    return ratios


ACTIVATION_SETTINGS = {  # label: (compiled, grad checkpointing, activation memory budget) of full's working copy
    "eager": (False, False, None),
    "compiled": (True, False, None),
    "compiled, budget 0.9": (True, False, 0.9),
    "compiled, budget 0.5": (True, False, 0.5),
    "compiled, grad checkpointing": (True, True, None),
}


def kept_activations_mib(forward, module, x):
    """MiB of the tensors other than ``module``'s parameters that ``forward(x)`` keeps for its backward
    pass (each storage once), under bf16 autocast as on a GPU (also on a CPU, where training runs fp32)."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, torch.bfloat16):
        forward(x)
    return sum(kept.values()) / 2**20


def measure_activations(args, device):
    """{label: figures} of the activations kept by one forward pass of full fine-tuning's working copy
    (`methods.backbones.working_copy`) under each of `ACTIVATION_SETTINGS`.

    Kept memory is affine in the batch size b: kept(b) = fixed + b · per_image, where ``fixed`` holds
    batch-independent tensors (autocast's bf16 weight copies); per_image = (kept(2n) − kept(n)) / n
    for n = ``--images``, and ``step_mib`` = fixed + 2 · support · per_image, the clean and the
    augmented support of one fine-tuning step.
    """
    import torch

    from methods import create_backbone
    from methods.backbones import working_copy

    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, pretrained=False)
    g = torch.Generator().manual_seed(0)
    images = {n: torch.randn(n, 3, args.image_size, args.image_size, generator=g).to(device)
              for n in (args.images, 2 * args.images)}
    figures = {}
    for label, (compiled, checkpointing, budget) in tqdm(ACTIVATION_SETTINGS.items(), desc="activations",
                                                         file=sys.stderr, leave=False, disable=None):
        work, compiled_forward = working_copy(backbone, "full", device, budget)
        work.eval().requires_grad_(True).set_grad_checkpointing(checkpointing)
        once, twice = (kept_activations_mib(compiled_forward if compiled else work, work, x) for x in images.values())
        per_image = (twice - once) / args.images
        fixed = once - args.images * per_image
        figures[label] = dict(mib_per_image=per_image, fixed_mib=fixed, step_mib=fixed + 2 * args.support * per_image)
    return figures


def activations_table(figures, support):
    from tabulate import tabulate

    rows = [[label, f"{f['mib_per_image']:.2f}", f"{f['fixed_mib']:.0f}", f"{f['step_mib']:,.0f}"] for label, f in figures.items()]
    return tabulate(rows, ["full fine-tuning", "MiB kept per image", "fixed MiB", f"MiB kept by a step ({2 * support} images)"],
                    tablefmt="github", disable_numparse=True)


def _profile(fn, device, path):
    """Profile one ``fn()``: its operators by device time (CPU time off CUDA) go to ``path``; returns the
    number of CUDA kernels it launched (None off CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40))
    if not cuda:
        return None
    return sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)


def _provenance():
    """What a figure was measured with: the code's git commit and the torch version."""
    import torch

    from benchmark.run import code_version

    return dict(code_version=code_version(), torch=torch.__version__)


def _describe(args, device, what):
    return dict(device=_device_label(device), backbone=args.backbone, image_size=args.image_size, ways=args.ways,
                support=args.support, query=args.query, what=what, **_provenance())


def _step_row(label, f):
    kernels = f"  {f['kernels']:,} kernels" if f.get("kernels") else ""
    return (f"{label:<{max(map(len, ['smat', *STEP_VARIANTS]))}} step {_cell(f['seconds'], '8.3f')} s  "
            f"peak {_cell(f['peak_memory_mib'], '.0f')} MiB" + kernels + _failure(f))


def print_ratios(step, device):
    """The ratio lines of `measure_step`'s result (its rows were printed as they were measured)."""
    for label, ratio in step["ratios"].items():
        if ratio is not None:
            met = ("met" if ratio <= STEP_RATIO_TARGET else "not met") if device.type == "cuda" else "a GPU target"
            setting = "" if label == "smat" else f" ({label[len('smat_'):]})"
            print(f"SMAT step / PMF step{setting} = {ratio:.2f} (target <= {STEP_RATIO_TARGET}: {met}) "
                  f"on {_device_label(device)}")


def run_adapters(args):
    """Seconds and peak memory per task of the meta-test adapters, as Table 5."""
    device = _device(args)
    print(f"# adapters on {_device_label(device)}: {args.backbone} (random weights), {args.ways}-way, "
          f"{args.support} support + {args.query} query at {args.image_size} px")
    forward = measure_forward(args, device)
    print_forward(forward)
    figures = measure_adapters(args, device)
    print(table5(figures))
    _write_json(args.json, {**_describe(args, device, "adapters"), "forward": forward, "adapters": figures})
    exit_if_failed({"forward": forward}, figures)


def run_step(args):
    """One SMAT meta-training step against one PMF step on the same tasks (the ratio the issue bounds by 2)."""
    device = _device(args)
    print(f"# meta-training step on {_device_label(device)}: {args.backbone} (random weights), {args.tasks} tasks "
          f"of {args.support} support + {args.query} query at {args.image_size} px")
    step = measure_step(args, device)
    print_ratios(step, device)
    _write_json(args.json, {**_describe(args, device, "step"), "tasks": args.tasks, **step})
    exit_if_failed(step["steps"])


def run_activations(args):
    """Activations kept for the backward pass by full fine-tuning's forward, per memory setting."""
    device = _device(args)
    print(f"# activations kept by full fine-tuning on {_device_label(device)}: {args.backbone} (random weights) "
          f"at {args.image_size} px")
    figures = measure_activations(args, device)
    print(activations_table(figures, args.support))
    _write_json(args.json, dict(device=_device_label(device), backbone=args.backbone, image_size=args.image_size,
                                support=args.support, images=args.images, what="activations", settings=figures,
                                **_provenance()))


def run_all(args, parser):
    """Every figure in one run (the prepared script for a GPU machine): Table 5's default adapters, the
    step, Table 5's variants, the data pipeline.

    The figures the issue's targets name come first and the CPU-side data figures, which any machine can
    measure, last, so a run stopped by a time limit loses the least; the JSON is rewritten after each row.
    """
    device = _device(args)
    shared = ["--backbone", args.backbone, "--image-size", str(args.image_size), "--repeats", str(args.repeats),
              "--device", str(device)]
    data_args = parser.parse_args(["data", "--workers", *map(str, args.workers), "--episodes", str(args.episodes)])
    adapter_args = parser.parse_args(["adapters", *shared])
    step_args = parser.parse_args(["step", *shared, *(["--profile", args.profile] if args.profile else [])])
    payload = dict(device=_device_label(device), cpu=_cpu_label(), backbone=args.backbone,
                   image_size=args.image_size, **_provenance())
    print(f"# Table 5 on {_device_label(device)}: {args.backbone} (random weights), {adapter_args.ways}-way, "
          f"{adapter_args.support} support + {adapter_args.query} query at {args.image_size} px")
    forward = payload["forward"] = measure_forward(adapter_args, device)
    print_forward(forward)
    _write_json(args.json, payload, quiet=True)
    payload["adapters"] = dict(ways=adapter_args.ways, support=adapter_args.support, query=adapter_args.query,
                               figures={})

    def saved(update):
        """After each row, ``update(the stage's figures so far)`` and the JSON rewritten: a time limit loses at
        most the row it stopped."""
        def save(figures):
            update(figures)
            _write_json(args.json, payload, quiet=True)

        return save

    adapters = payload["adapters"]["figures"]  # filled row by row, defaults then variants
    measure_adapters(adapter_args, device, variants=False, measured=saved(adapters.update))
    print(table5(adapters))
    print(f"\n# meta-training step: {step_args.tasks} tasks of {step_args.support} support + {step_args.query} query")
    payload["step"] = dict(tasks=step_args.tasks, support=step_args.support, query=step_args.query, steps={})
    step = measure_step(step_args, device, measured=saved(payload["step"].update))
    print_ratios(step, device)
    print("\n# Table 5 with the adapters' other settings")
    measure_adapters(adapter_args, device, defaults=False, measured=saved(adapters.update))
    print(table5(adapters))
    print()
    payload["data"] = []
    data_stage(data_args, measured=saved(lambda rows: payload.update(data=rows)))
    _write_json(args.json, payload)
    exit_if_failed({"forward": forward}, adapters, step["steps"])


def _model_flags(parser):
    """The model, device and output flags."""
    parser.add_argument("--backbone", default="vit_small_patch16_224", help="timm model (random weights)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def _compute_flags(parser, support=None, query=None):
    """The model, device and timing flags; with ``support`` and ``query``, also the synthetic episode's size."""
    _model_flags(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median reported)")
    if support is not None:
        parser.add_argument("--ways", type=int, default=20)
        parser.add_argument("--support", type=int, default=support)
        parser.add_argument("--query", type=int, default=query)


def main(argv=None):
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="episodes/s of decoded episode assembly from records")
    data.add_argument("--inputs", nargs="+", choices=["mini", "md"], default=["mini", "md"])
    data.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader worker counts to time")
    data.add_argument("--episodes", type=int, default=10, help="episodes per source and worker count")
    data.add_argument("--classes", type=int, default=50, help="classes of the generated MD-sized source")
    data.add_argument("--images-per-class", type=int, default=120)
    data.add_argument("--image-px", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    data.add_argument("--json", help="also write the figures to this JSON file")
    adapters = commands.add_parser("adapters", help="s/task and peak memory of the meta-test adapters (Table 5)")
    _compute_flags(adapters, support=400, query=200)
    adapters.add_argument("--adapters", nargs="+", default=["protonet", "gradient_free", "full"])
    step = commands.add_parser("step", help="a SMAT meta-training step against a PMF step on the same tasks")
    _compute_flags(step, support=100, query=100)
    step.add_argument("--tasks", type=int, default=4)
    step.add_argument("--profile", metavar="DIR", help="also profile one step of each, into DIR/step_<label>.txt")
    activations = commands.add_parser("activations", help="activations full fine-tuning keeps per image, per memory setting")
    _model_flags(activations)
    activations.add_argument("--support", type=int, default=400, help="support images of the projected step")
    activations.add_argument("--images", type=int, default=16, help="batch n; kept memory is measured at n and 2n")
    every = commands.add_parser("all", help="data, adapters and step in one run, one JSON file")
    _compute_flags(every)
    every.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader worker counts to time")
    every.add_argument("--episodes", type=int, default=10, help="data: episodes per source and worker count")
    every.add_argument("--profile", metavar="DIR", help="step: also profile one step of each, into DIR")
    args = parser.parse_args(argv)
    with exit_on_error(PROG):
        if args.command == "all":
            run_all(args, parser)
        else:
            {"data": run_data, "adapters": run_adapters, "step": run_step,
             "activations": run_activations}[args.command](args)


if __name__ == "__main__":
    main()
