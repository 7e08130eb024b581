"""Episodes: identity -> description -> records -> decoded, preprocessed tensors.

An episode is a pure function of its identity ``(benchmark, source, split, seed, episode)``:

* its **description** is element ``episode`` of the official sampler stream for ``seed``
  (`registry.sampling.EpisodeDescriptionSampler.from_seed` on the source's spec, split and the
  benchmark's episode config);
* its **images**: for class j of the description, with (k_j support, q_j query), k_j + q_j distinct
  record indices are drawn uniformly without replacement from the class's n_j records by a
  generator seeded with a hash of the identity; the first k_j are the support, the rest the query.
  So no image appears twice within an episode, and every record is equally likely.
* **labels** follow the description order: the j-th class gets label j in support and query.
  Examples stay grouped by class, in that order.

Hence any episode can be rebuilt alone (in a worker process, after a resume), and every method
sees the same episodes. (The official pipeline's per-class shuffle buffers and flush are a
TensorFlow stream that cannot be seeded; this is the exact-uniform variant, as in
pytorch-meta-dataset, and is documented as the deliberate departure.)

Meta-training draws episode e's source uniformly from the benchmark's training sources with a
generator seeded by the run seed, then takes that source's next description; each source has its
own official sampler, seeded in ``train_sources`` order from one module RNG of the run seed.
"""

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm import tqdm

from benchmark.preprocess import Preprocess
from benchmark.records import RecordFile, check_count, check_label, decode_image
from registry.catalog import get_benchmark, resolve_records_root
from registry.dataset_spec import Split
from registry.errors import DataError
from registry.sampling import EpisodeDescriptionSampler

__all__ = [
    "EpisodeId",
    "Episode",
    "DescriptionStream",
    "SourceRecords",
    "BenchmarkData",
    "EvalEpisodes",
    "TrainEpisodes",
    "episode_loader",
]


@dataclass(frozen=True)
class EpisodeId:
    """The identity of an episode; equal identities give identical episodes."""

    benchmark: str
    source: str
    split: str
    seed: int
    episode: int

    def image_rng(self):
        """The generator that picks this episode's records: seeded by a SHA-256 of the identity."""
        key = f"{self.benchmark}/{self.source}/{self.split}/{self.seed}/{self.episode}".encode()
        words = np.frombuffer(hashlib.sha256(key).digest(), dtype="<u4")
        return np.random.default_rng(np.random.SeedSequence(words.tolist()))


@dataclass
class Episode:
    """One decoded episode; labels ``int64`` in ``0..ways−1``.

    ``*_pixels`` are the resized images as assembled, ``N×3×s×s`` grey levels in [0, 255]: uint8 where
    they are integers (from the decoded cache, or resized by ``center_crop``), else float32. They
    travel between processes and to the GPU at a quarter of the size of float32 inputs; ``*_images``
    (or `inputs` on a device) are the network inputs, ``preprocess.normalize``-d float32.
    ``*_records`` are ``int64 N×2`` arrays of (absolute class id, record index), for provenance.
    """

    id: EpisodeId
    description: tuple
    support_pixels: torch.Tensor
    support_labels: torch.Tensor
    query_pixels: torch.Tensor
    query_labels: torch.Tensor
    support_records: np.ndarray
    query_records: np.ndarray
    preprocess: Preprocess

    @property
    def ways(self):
        return len(self.description)

    def _input(self, pixels, device):
        return self.preprocess.normalize(pixels.to(device, non_blocking=True).float())

    def inputs(self, device="cpu"):
        """(support images, query images): the pixels copied to ``device`` (non-blocking), then normalised there."""
        return self._input(self.support_pixels, device), self._input(self.query_pixels, device)

    @property
    def support_images(self):
        return self._input(self.support_pixels, "cpu")

    @property
    def query_images(self):
        return self._input(self.query_pixels, "cpu")

    def pin_memory(self):
        """This episode with its tensors in page-locked memory, so copies to a GPU can be non-blocking."""
        tensors = ("support_pixels", "support_labels", "query_pixels", "query_labels")
        return dataclasses.replace(self, **{name: getattr(self, name).pin_memory() for name in tensors})


class DescriptionStream:
    """Descriptions 0, 1, 2, ... of one official sampler, drawn once and kept.

    Element i is the i-th ``sample_episode_description()`` of the sampler, so ``stream[i]`` is the
    same whatever order elements are asked for in.
    """

    def __init__(self, sampler, where):
        self._sampler = sampler
        self._where = where
        self._drawn = []

    def __getitem__(self, i):
        while len(self._drawn) <= i:
            try:
                self._drawn.append(self._sampler.sample_episode_description())
            except ValueError as err:
                raise DataError(f"{self._where}, episode {len(self._drawn)}: {err}") from None
        return self._drawn[i]


class SourceRecords:
    """One source on disk: its checked spec, its class files, its preprocessing and, optionally, its decoded cache.

    Args:
        source: the declared `registry.catalog.Source`.
        records_root: the directory holding ``<source>/dataset_spec.json``.
        preprocess: the `Preprocess` of this source in its benchmark.
        decoded: a `benchmark.cache.DecodedCache` to read resized pixels from instead of decoding records;
            its cache of this source and preprocessing is checked against the spec here.
    """

    def __init__(self, source, records_root, preprocess, decoded=None):
        self.source = source
        self.spec = source.load_spec(records_root)
        self.preprocess = preprocess
        self.decoded = None if decoded is None else decoded.open(source.name, self.spec, preprocess)
        self._files = {}
        self._contents = {}

    def record_file(self, class_id):
        """The `RecordFile` of absolute class ``class_id``, whose errors name this source's fix; a missing file
        is a `DataError` naming the fix."""
        if class_id not in self._files:
            path = self.spec.class_path(class_id)
            if not path.is_file():
                raise DataError(f"{path}: missing class file of source '{self.source.name}'; {self.source.how_to_fix()}")
            self._files[class_id] = RecordFile(path, fix=self.source.how_to_fix())
        return self._files[class_id]

    def class_content(self, class_id):
        """The content fingerprint of the records of absolute class ``class_id`` (`RecordFile.fingerprint`),
        taken from the decoded cache when there is one (it keeps that of the records it was built from)."""
        if class_id not in self._contents:
            if self.decoded is not None:
                self._contents[class_id] = self.decoded.classes[str(class_id)]["content"]
            else:
                records = self.record_file(class_id)
                try:
                    self._contents[class_id] = records.fingerprint()
                finally:
                    records.close()
        return self._contents[class_id]

    def episode_digest(self, episode):
        """What makes ``episode``'s inputs, as 16 hex digits of a SHA-256: the preprocessing, the stored pixel
        type, and per image (support, then query, in order) its class, its record index and the content
        fingerprint of its class's records. Equal digests: the same images (by content), in the same
        order, with the same labels, made into the same inputs; result rows carry it (``episode_digest``)."""
        classes = np.unique(np.concatenate([episode.support_records[:, 0], episode.query_records[:, 0]]))
        what = dict(preprocess=dataclasses.asdict(self.preprocess), pixels=str(self.stored_dtype),
                    contents={int(c): self.class_content(int(c)) for c in classes},
                    support=episode.support_records.tolist(), query=episode.query_records.tolist())
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def pixels(self, class_id, indices):
        """Records ``indices`` of absolute class ``class_id``, decoded and resized: float32 ``N×3×s×s`` grey levels.

        The one place where records become pixels: `stored_pixels` and the decoded cache (`benchmark.cache`) use it.

        Raises:
            DataError: the class file is missing, holds another number of records than the spec says, or a
                record has another label than ``class_id``.
        """
        records, fix = self.record_file(class_id), self.source.how_to_fix()
        try:
            check_count(records.path, len(records), self.spec.get_total_images_per_class(class_id), fix)
            out = []
            for i in indices:
                image, label = records.example(int(i))
                check_label(records.path, i, label, class_id, fix)
                out.append(self.preprocess.resized(decode_image(image, where=f"{records.path} record {i}")))
        finally:
            records.close()  # thousands of class files: keep the offsets, not the handles
        return torch.stack(out) if out else torch.empty(0, 3, self.preprocess.image_size, self.preprocess.image_size)

    def check_class(self, class_id):
        """Check, without reading any image, the file that episodes read class ``class_id`` from; return its
        record count.

        From the decoded cache, when there is one: its class file is there, complete, of the spec's shape.
        Else the record file: it is there, its framing holds (every record header's masked CRC-32C, each
        record ends inside the file; 12 bytes read per record) and it holds the spec's record count.
        Payload CRCs and labels are checked as records are read, and by ``python -m benchmark.records verify``:
        here they would mean reading every byte of the source.

        Raises:
            DataError: the first fault; names the file, the record and its byte offset, and the fix.
        """
        if self.decoded is not None:
            return self.decoded.records_in(class_id)
        records, expected = self.record_file(class_id), self.spec.get_total_images_per_class(class_id)
        try:
            check_count(records.path, len(records), expected, self.source.how_to_fix())
        finally:
            records.close()  # the offsets stay for the episodes, not the handle
        return expected

    @property
    def stored_dtype(self):
        """What episodes carry (`Episode`): uint8 from the decoded cache or under ``center_crop``
        (PIL output is integer), else float32."""
        return torch.uint8 if self.decoded is not None or self.preprocess.resize == "center_crop" else torch.float32

    def stored_pixels(self, class_id, indices, out=None):
        """The pixels of records ``indices`` of class ``class_id`` as episodes carry them (`stored_dtype`),
        written into ``out`` (a contiguous ``N×3×s×s`` tensor of that dtype) when given.

        From the decoded cache when there is one (equal to `pixels` under ``center_crop``, `pixels`
        rounded to the nearest grey level under ``squash``), read straight into ``out``; else `pixels`.
        """
        if out is None:
            size = self.preprocess.image_size
            out = torch.empty(len(indices), 3, size, size, dtype=self.stored_dtype)
        if self.decoded is not None:
            return self.decoded.read(class_id, indices, out)
        return out.copy_(self.pixels(class_id, indices))

    def images(self, class_id, indices):
        """Records ``indices`` of absolute class ``class_id``, preprocessed (float32 ``N×3×s×s``)."""
        return self.preprocess.normalize(self.stored_pixels(class_id, indices).float())

    def episode(self, episode_id, description, split):
        """Assemble the `Episode` of ``description`` (relative ids of ``split``) for ``episode_id``."""
        rng = episode_id.image_rng()
        offset = self.spec.split_offset(split)
        support, query = [], []
        for rel_id, k, q in description:
            class_id = offset + rel_id
            picked = rng.choice(self.spec.get_total_images_per_class(class_id), size=k + q, replace=False)
            support.append((class_id, picked[:k]))
            query.append((class_id, picked[k:]))
        (s_img, s_lab, s_rec), (q_img, q_lab, q_rec) = self._gather(support), self._gather(query)
        return Episode(episode_id, description, s_img, s_lab, q_img, q_lab, s_rec, q_rec, self.preprocess)

    def _gather(self, parts):
        """(pixels, labels, records) of one set, ``parts`` = [(class id, record indices)] for labels 0, 1, ...

        The pixels go straight into the set's batch tensor, one slice per class (`stored_pixels`).
        """
        sizes = [len(indices) for _, indices in parts]
        pixels = torch.empty(sum(sizes), 3, self.preprocess.image_size, self.preprocess.image_size,
                             dtype=self.stored_dtype)
        for (class_id, indices), out in zip(parts, pixels.split(sizes), strict=True):
            self.stored_pixels(class_id, indices, out)
        labels = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(sizes, dtype=torch.int64))
        records = np.concatenate([np.stack([np.full(len(indices), class_id), indices], axis=1)
                                  for class_id, indices in parts]).astype(np.int64)
        return pixels, labels, records


class BenchmarkData:
    """A benchmark opened on its records: checked specs and preprocessing for every source it uses.

    Args:
        benchmark: a `registry.catalog.Benchmark` or its name.
        records_root: the converted records (see `registry.catalog.resolve_records_root`).
        decoded_cache: a directory built by ``python -m benchmark.cache build``; every source of the
            benchmark must have its cache there, which is then read instead of decoding records.
            None decodes records.

    Example:
        >>> data = BenchmarkData("md_mini")
        >>> episode = data.eval_episodes("mini_digits", "test")[0]
    """

    def __init__(self, benchmark, records_root=None, decoded_cache=None):
        self.benchmark = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
        self.records_root = resolve_records_root(self.benchmark, records_root)
        decoded = None
        if decoded_cache is not None:
            from benchmark.cache import DecodedCache  # benchmark.cache builds on this module

            decoded = DecodedCache(decoded_cache, self.benchmark.name, self.records_root)
        self.sources = {
            s.name: SourceRecords(s, self.records_root, Preprocess.for_source(s, self.benchmark.preprocessing), decoded)
            for s in self.benchmark.sources
        }

    def source(self, name):
        if name not in self.sources:
            raise DataError(
                f"benchmark '{self.benchmark.name}' does not use source {name!r}; it uses {', '.join(self.sources)}"
            )
        return self.sources[name]

    def splits_read(self, train, evaluate):
        """{source name: [splits]} of the records a run reads: meta-training (``train``) reads the TRAIN split
        of ``train_sources`` and validates on the VALID split of ``valid_sources``; meta-testing
        (``evaluate``) reads the TEST split of ``test_sources`` and searches learning rates on the VALID
        split of a test source or of ``valid_sources`` (`benchmark.evaluate.search_basis`)."""
        bench, wanted = self.benchmark, []
        if train:
            wanted += [(s, Split.TRAIN) for s in bench.train_sources] + [(s, Split.VALID) for s in bench.valid_sources]
        if evaluate:
            wanted += [(s, split) for s in bench.test_sources for split in (Split.TEST, Split.VALID)]
            wanted += [(s, Split.VALID) for s in bench.valid_sources]
        splits = {}
        for source, split in wanted:
            if split not in splits.setdefault(source.name, []):
                splits[source.name].append(split)
        return splits

    def check(self, train=True, evaluate=True, progress=True):
        """Check every class file a run reads (`splits_read`, `SourceRecords.check_class`) before it starts,
        so a corrupt or missing file stops it before hours of meta-training, not when its class is first
        drawn. Return the one-line summary.

        It reads 12 bytes per record and no image. Measured from a cold page cache on a local disk: 0.09 s for
        md_mini (4.4k records); 1.6 s for 1 GB of 100 kB records, whose payload CRCs would take 3.7 s; 7.6 s
        for 200k records of 10 kB. A progress bar (``progress``) goes to stderr when it is a terminal.

        Raises:
            DataError: the first fault; names the file, the record and its byte offset, and the fix.
        """
        began = time.perf_counter()
        classes = [(name, c) for name, splits in self.splits_read(train, evaluate).items()
                   for split in splits for c in self.source(name).spec.get_classes(split)]
        records = 0
        for name, class_id in tqdm(classes, desc="checking records", unit="class", disable=None if progress else True):
            records += self.source(name).check_class(class_id)
        cached = any(s.decoded is not None for s in self.sources.values())
        kind = "decoded-cache files (shape)" if cached else "record files (framing, record count)"
        names = ", ".join(dict.fromkeys(name for name, _ in classes))
        return f"checked {len(classes)} {kind} of {names}: {records} records in {time.perf_counter() - began:.2f} s"

    def description_stream(self, source, split, seed, rng=None):
        """The official description stream of ``source``/``split`` for ``seed`` (or a given sampler RNG)."""
        records, split = self.source(source), Split.parse(split)
        config = self.benchmark.config_for(split)
        where = f"benchmark '{self.benchmark.name}', source '{source}', split {split.value.lower()}, seed {seed}"
        try:
            if rng is None:
                sampler = EpisodeDescriptionSampler.from_seed(records.spec, split, config, seed)
            else:
                sampler = EpisodeDescriptionSampler(records.spec, split, config, rng=rng)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        return DescriptionStream(sampler, where)

    def eval_episodes(self, source, split, seed=None, num_episodes=None):
        """The fixed validation or test episodes of one source (default: the benchmark's seed and count)."""
        split = Split.parse(split)
        default_n = self.benchmark.test_episodes if split is Split.TEST else self.benchmark.valid_episodes
        return EvalEpisodes(
            self, source, split, self.benchmark.seed if seed is None else seed, default_n if num_episodes is None else num_episodes
        )

    def train_episodes(self, seed, num_episodes, start=0):
        """Meta-training episodes ``start .. start + num_episodes − 1`` of the run seeded ``seed``."""
        return TrainEpisodes(self, seed, num_episodes, start)


class EvalEpisodes(torch.utils.data.Dataset):
    """Episodes ``0 .. num_episodes − 1`` of one (source, split, seed): a map-style dataset."""

    def __init__(self, data, source, split, seed, num_episodes):
        self.data, self.source, self.split, self.seed, self.num_episodes = data, source, split, seed, num_episodes
        self._stream = data.description_stream(source, split, seed)

    def __len__(self):
        return self.num_episodes

    def episode_id(self, i):
        return EpisodeId(self.data.benchmark.name, self.source, self.split.value.lower(), self.seed, i)

    def __getitem__(self, i):
        if not 0 <= i < self.num_episodes:
            raise IndexError(i)
        return self.data.source(self.source).episode(self.episode_id(i), self._stream[i], self.split)


class TrainEpisodes(torch.utils.data.Dataset):
    """Meta-training episodes ``start + i``: source e uniform over ``train_sources``, then its next description.

    Episode e's source comes from ``integers(0, #sources)`` draw e of a generator seeded by the run
    seed; its description is element k of that source's stream, where k counts the earlier episodes
    that drew the same source. Both are recomputed from scratch, so a resumed run continues exactly.
    """

    SOURCE_CHOICE_TAG = 0x7E41  # separates the source-choice stream from other uses of the seed

    def __init__(self, data, seed, num_episodes, start=0):
        self.data, self.seed, self.num_episodes, self.start = data, seed, num_episodes, start
        self.sources = [s.name for s in data.benchmark.train_sources]
        if not self.sources:
            raise DataError(f"benchmark '{data.benchmark.name}' has no train_sources to meta-train on")
        module_rng = np.random.RandomState(seed)  # one official sampler per source, seeded in order
        self._streams = [
            data.description_stream(s, Split.TRAIN, seed, rng=np.random.RandomState(module_rng.randint(0, 2**32, dtype="uint32")))
            for s in self.sources
        ]

    @cached_property
    def _schedule(self):
        """(source index, index within that source's stream) of every episode up to the last one."""
        end = self.start + self.num_episodes
        choice = np.random.default_rng([self.seed, self.SOURCE_CHOICE_TAG]).integers(0, len(self.sources), size=end)
        within = np.zeros(end, dtype=np.int64)
        for s in range(len(self.sources)):
            hits = np.flatnonzero(choice == s)
            within[hits] = np.arange(len(hits))
        return choice, within

    def __len__(self):
        return self.num_episodes

    def __getitem__(self, i):
        if not 0 <= i < self.num_episodes:
            raise IndexError(i)
        e = self.start + i
        choice, within = self._schedule
        source = self.sources[choice[e]]
        episode_id = EpisodeId(self.data.benchmark.name, source, "train", self.seed, e)
        description = self._streams[choice[e]][within[e]]
        return self.data.source(source).episode(episode_id, description, Split.TRAIN)


def episode_loader(episodes, num_workers=0, pin_memory=False):
    """A ``DataLoader`` yielding `Episode` objects in index order, decoded by ``num_workers`` processes.

    With ``pin_memory`` (for a CUDA device) episodes arrive in page-locked memory, so that
    `methods.Task.from_episode` copies them without blocking.

    Episodes are pure functions of their identity, so the loader needs no randomness: it gets a
    generator of its own, and starting an iteration never draws from the global torch RNG (which
    would shift the random stream of a resumed training run).
    """
    return torch.utils.data.DataLoader(
        episodes,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


def _as_is(episode):
    """The loader's per-item conversion: episodes are already tensors (a named function pickles)."""
    return episode
