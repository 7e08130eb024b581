"""The three official Meta-Dataset ``dataset_spec.json`` kinds, read and written without TensorFlow.

A converted source is a directory ``<records>/<name>/`` holding ``dataset_spec.json`` and one
``<class_id>.tfrecords`` per class. Class ids are contiguous by split: TRAIN ids first, then VALID,
then TEST, so split ``s`` owns ``range(offset_s, offset_s + classes_per_split[s])``.

* `DatasetSpecification` (flat): ``classes_per_split`` and ``images_per_class`` are given directly.
* `BiLevelDatasetSpecification` (Omniglot): superclasses (alphabets) are contiguous by split and
  classes contiguous by superclass; a split's classes are those of its superclasses.
* `HierarchicalDatasetSpecification` (ILSVRC-2012): one sub-DAG of WordNet per split whose leaves are
  the split's classes; ``class_names`` maps an id to a leaf's ``wn_id`` (ids enumerate the sorted
  TRAIN leaves, then VALID, then TEST).

Every kind round-trips: ``from_dict(spec.to_dict()) == spec`` and `dump_dataset_spec` writes the
official JSON (``"__class__"`` tag, string keys). `load_dataset_spec` replaces ``path`` with the
directory the file was read from, as the official loader does.

Example:
    >>> spec = load_dataset_spec("records/aircraft")
    >>> spec.get_classes(Split.TEST)
    range(85, 100)
"""

import enum
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from registry.errors import DataError

__all__ = [
    "Split",
    "DatasetSpecification",
    "BiLevelDatasetSpecification",
    "HierarchicalDatasetSpecification",
    "from_dict",
    "load_dataset_spec",
    "dump_dataset_spec",
    "SPEC_FILENAME",
]

SPEC_FILENAME = "dataset_spec.json"


class Split(str, enum.Enum):
    """A split of a source's classes; the value is the key used in ``dataset_spec.json``."""

    TRAIN = "TRAIN"
    VALID = "VALID"
    TEST = "TEST"

    def __str__(self):  # the official messages render a split as ``Split.TRAIN``
        return f"Split.{self.value}"

    @classmethod
    def parse(cls, name):
        """``'train'``, ``'TRAIN'`` or a `Split` -> `Split`; anything else raises `DataError`."""
        if isinstance(name, cls):
            return name
        try:
            return cls(str(name).upper())
        except ValueError:
            raise DataError(f"unknown split {name!r}; choose one of train, valid, test") from None


def _int_keys(mapping):
    return {int(k): v for k, v in mapping.items()}


def _str_keys(mapping):
    return {str(k): v for k, v in mapping.items()}


def _counts(mapping, table):
    """``mapping`` with int values; a negative one raises `ValueError` naming the entry of ``table``."""
    counts = {k: int(v) for k, v in mapping.items()}
    for key, count in counts.items():
        if count < 0:
            raise ValueError(f"{table} entry {key} is {count}; a count cannot be negative")
    return counts


def _split_counts(mapping, table):
    """{"TRAIN": n, ...} -> {Split.TRAIN: n, ...} with every split present (absent means 0)."""
    counts = {Split.parse(k): v for k, v in _counts(mapping, table).items()}
    return {s: counts.get(s, 0) for s in Split}


@dataclass(frozen=True)
class _SpecBase:
    """What every spec kind answers: split ranges, image counts and class file paths."""

    # Each kind provides ``classes_per_split``: {Split: number of classes}, for all three splits.

    @property
    def num_classes(self):
        return sum(self.classes_per_split.values())

    def split_offset(self, split):
        """First absolute class id of ``split``."""
        split = Split.parse(split)
        order = list(Split)
        return sum(self.classes_per_split[s] for s in order[: order.index(split)])

    def get_classes(self, split):
        """Absolute class ids of ``split``, a contiguous ``range``."""
        start = self.split_offset(split)
        return range(start, start + self.classes_per_split[Split.parse(split)])

    def split_of_class(self, class_id):
        for split in Split:
            if class_id in self.get_classes(split):
                return split
        raise DataError(f"{self.name}: class id {class_id} is outside 0..{self.num_classes - 1}")

    def get_total_images_per_class(self, class_id):
        """Number of images (records) of absolute class ``class_id``."""
        try:
            return self.images_per_class[class_id]
        except KeyError:
            raise DataError(
                f"{self.name}: dataset_spec.json has no image count for class {class_id}"
            ) from None

    def class_path(self, class_id):
        """Path of the record file of absolute class ``class_id``."""
        if self.file_pattern != "{}.tfrecords":
            raise DataError(
                f"{self.name}: file_pattern {self.file_pattern!r} is not supported; re-convert the source "
                "with the official converter (file_pattern '{{}}.tfrecords')"
            )
        return Path(self.path) / self.file_pattern.format(class_id)


@dataclass(frozen=True)
class DatasetSpecification(_SpecBase):
    """A flat spec: ``classes_per_split`` and ``images_per_class`` as stored."""

    name: str
    classes_per_split: dict = field(repr=False)
    images_per_class: dict = field(repr=False)
    class_names: dict = field(repr=False)
    path: str = ""
    file_pattern: str = "{}.tfrecords"

    @classmethod
    def from_dict(cls, d):
        return cls(
            name=d["name"],
            classes_per_split=_split_counts(d["classes_per_split"], "classes_per_split"),
            images_per_class=_int_keys(_counts(d["images_per_class"], "images_per_class")),
            class_names=_int_keys(d["class_names"]),
            path=d.get("path", ""),
            file_pattern=d.get("file_pattern", "{}.tfrecords"),
        )

    def to_dict(self):
        return {
            "name": self.name,
            "classes_per_split": {s.value: self.classes_per_split[s] for s in Split},
            "images_per_class": _str_keys(self.images_per_class),
            "class_names": _str_keys(self.class_names),
            "path": self.path,
            "file_pattern": self.file_pattern,
            "__class__": type(self).__name__,
        }


@dataclass(frozen=True)
class BiLevelDatasetSpecification(_SpecBase):
    """Omniglot's two-level spec: superclasses (alphabets) by split, classes by superclass."""

    name: str
    superclasses_per_split: dict = field(repr=False)
    classes_per_superclass: dict = field(repr=False)
    images_per_class: dict = field(repr=False)
    superclass_names: dict = field(repr=False)
    class_names: dict = field(repr=False)
    path: str = ""
    file_pattern: str = "{}.tfrecords"

    def get_superclasses(self, split):
        """Absolute superclass ids of ``split``, a contiguous ``range``."""
        split = Split.parse(split)
        order = list(Split)
        start = sum(self.superclasses_per_split[s] for s in order[: order.index(split)])
        return range(start, start + self.superclasses_per_split[split])

    def class_offset_of_superclass(self, superclass_id):
        """Absolute id of the first class of ``superclass_id`` (classes are contiguous by superclass)."""
        return sum(self.classes_per_superclass[s] for s in range(superclass_id))

    @cached_property
    def classes_per_split(self):
        return {s: sum(self.classes_per_superclass[i] for i in self.get_superclasses(s)) for s in Split}

    @classmethod
    def from_dict(cls, d):
        return cls(
            name=d["name"],
            superclasses_per_split=_split_counts(d["superclasses_per_split"], "superclasses_per_split"),
            classes_per_superclass=_int_keys(_counts(d["classes_per_superclass"], "classes_per_superclass")),
            images_per_class=_int_keys(_counts(d["images_per_class"], "images_per_class")),
            superclass_names=_int_keys(d["superclass_names"]),
            class_names=_int_keys(d["class_names"]),
            path=d.get("path", ""),
            file_pattern=d.get("file_pattern", "{}.tfrecords"),
        )

    def to_dict(self):
        return {
            "name": self.name,
            "superclasses_per_split": {s.value: self.superclasses_per_split[s] for s in Split},
            "classes_per_superclass": _str_keys(self.classes_per_superclass),
            "images_per_class": _str_keys(self.images_per_class),
            "superclass_names": _str_keys(self.superclass_names),
            "class_names": _str_keys(self.class_names),
            "path": self.path,
            "file_pattern": self.file_pattern,
            "__class__": type(self).__name__,
        }


@dataclass(frozen=True)
class HierarchicalDatasetSpecification(_SpecBase):
    """ILSVRC-2012's spec: per split, a WordNet sub-DAG whose leaves are the split's classes.

    ``split_subgraphs`` is {Split: [{wn_id, words, children_ids, parents_ids}, ...]} as stored;
    ``images_per_class`` is {Split: {wn_id: count}} (internal nodes count the leaves they span).
    """

    name: str
    split_subgraphs: dict = field(repr=False)
    images_per_class_by_wn_id: dict = field(repr=False)
    class_names: dict = field(repr=False)
    path: str = ""
    file_pattern: str = "{}.tfrecords"

    @cached_property
    def classes_per_split(self):
        return {s: len(self.leaves(s)) for s in Split}

    @cached_property
    def _graphs(self):
        """{Split: {wn_id: children_ids}}, checked: every child is a node of the same split, and no node is
        its own descendant.

        Raises:
            DataError: naming the node and split where the sub-DAG is broken.
        """
        graphs = {}
        for split in Split:
            children = {n["wn_id"]: n["children_ids"] for n in self.split_subgraphs.get(split, [])}
            done, path = set(), []

            def visit(wn):
                if wn in path:
                    cycle = " -> ".join(path[path.index(wn):] + [wn])
                    raise DataError(f"{self.name}: dataset_spec.json's {split.value} sub-DAG has a cycle ({cycle}); "
                                    "re-run the conversion")
                if wn in done:
                    return
                path.append(wn)
                for kid in children[wn]:
                    if kid not in children:
                        raise DataError(f"{self.name}: dataset_spec.json's node {wn} has a child {kid} that is not "
                                        f"a node of the {split.value} split; re-run the conversion")
                    visit(kid)
                path.pop()
                done.add(wn)

            for wn in children:
                visit(wn)
            graphs[split] = children
        return graphs

    def _children(self, split):
        return self._graphs[split]

    def leaves(self, split):
        """wn_ids of the leaves of ``split``'s sub-DAG, sorted."""
        return sorted(wn for wn, children in self._children(Split.parse(split)).items() if not children)

    def spanning_leaves(self, split):
        """[(wn_id, sorted wn_ids of the leaves it spans)] for every internal node, sorted by wn_id."""
        children = self._children(Split.parse(split))
        memo = {}

        def span(wn):
            if wn not in memo:
                kids = children[wn]
                memo[wn] = {wn} if not kids else set().union(*(span(k) for k in kids))
            return memo[wn]

        return [(wn, sorted(span(wn))) for wn in sorted(children) if children[wn]]

    @cached_property
    def class_names_to_ids(self):
        return {wn: i for i, wn in self.class_names.items()}

    @cached_property
    def images_per_class(self):
        """{absolute class id: image count}, from the per-split leaf counts."""
        counts = {}
        for split in Split:
            by_wn = self.images_per_class_by_wn_id.get(split, {})
            for wn in self.leaves(split):
                for key, table in (("class_names", self.class_names_to_ids), (f"images_per_class.{split.value}", by_wn)):
                    if wn not in table:
                        raise DataError(f"{self.name}: dataset_spec.json has no {key} entry for {wn}, a leaf "
                                        f"of the {split.value} split; re-run the conversion")
                counts[self.class_names_to_ids[wn]] = by_wn[wn]
        return counts

    @classmethod
    def from_dict(cls, d):
        return cls(
            name=d["name"],
            split_subgraphs={Split.parse(k): v for k, v in d["split_subgraphs"].items()},
            images_per_class_by_wn_id={
                Split.parse(k): _counts(v, f"images_per_class.{k}") for k, v in d["images_per_class"].items()
            },
            class_names=_int_keys(d["class_names"]),
            path=d.get("path", ""),
            file_pattern=d.get("file_pattern", "{}.tfrecords"),
        )

    def to_dict(self):
        return {
            "name": self.name,
            "split_subgraphs": {s.value: v for s, v in self.split_subgraphs.items()},
            "images_per_class": {s.value: dict(v) for s, v in self.images_per_class_by_wn_id.items()},
            "class_names": _str_keys(self.class_names),
            "path": self.path,
            "file_pattern": self.file_pattern,
            "__class__": type(self).__name__,
        }


_KINDS = {
    k.__name__: k
    for k in (DatasetSpecification, BiLevelDatasetSpecification, HierarchicalDatasetSpecification)
}


def from_dict(d, where="dataset_spec.json"):
    """Rebuild the right spec kind from its ``"__class__"`` tag (the official ``as_dataset_spec`` hook)."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: not a dataset spec (its top level is a JSON {type(d).__name__}, not an object); "
                        "re-run the conversion")
    kind = d.get("__class__")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise DataError(
            f"{where}: '__class__' is {kind!r}; expected one of {', '.join(_KINDS)} "
            "(is this a Meta-Dataset dataset_spec.json?)"
        )
    try:
        spec = _KINDS[kind].from_dict(d)
        spec.classes_per_split, spec.images_per_class  # derived tables, checked here rather than at first use
        return spec
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{where}: malformed {kind} ({type(err).__name__}: {err}); re-run the conversion") from None


def load_dataset_spec(path):
    """Load ``dataset_spec.json`` from a source directory (or the file itself).

    ``path`` in the returned spec is the directory the file was read from.

    Raises:
        DataError: the file is missing, not JSON, or not a dataset spec (a missing table or entry, a negative count).
    """
    path = Path(path)
    file = path if path.suffix == ".json" else path / SPEC_FILENAME
    if not file.is_file():
        raise DataError(
            f"{file}: no such file; point at a converted Meta-Dataset source directory "
            f"(holding {SPEC_FILENAME} and <class_id>.tfrecords) or at the JSON file itself"
        )
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: not valid JSON ({err}); re-run the conversion") from None
    if isinstance(d, dict):
        d["path"] = os.fspath(file.parent)
    return from_dict(d, where=os.fspath(file))


def dump_dataset_spec(spec, path):
    """Write ``spec`` as the official JSON (``indent=2``) to ``path`` (a directory or a .json file)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / SPEC_FILENAME
    file.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return file
