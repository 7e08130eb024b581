"""The official Meta-Dataset episode description sampler, re-implemented draw for draw.

An *episode description* is a tuple of ``(relative_class_id, num_support, num_query)`` triples, one
per class (way). Relative ids index the classes of one split: absolute id = split offset + relative
id. For one episode:

1. **Classes.** Flat sources: W ~ U{min_ways .. min(max_ways_upper_bound, #classes)} (or the fixed
   ``num_ways``), then W classes uniformly without replacement. Bilevel (Omniglot): one superclass
   uniformly, W ~ U{min_ways .. min(max_ways_upper_bound, its size)}, W of its classes. DAG
   (ImageNet): one eligible internal node uniformly; its spanned leaves are the classes,
   subsampled to ``max_ways_upper_bound`` when there are more.
2. **Query.** One q for every class: ``num_query`` if fixed, else q = min(max_num_query,
   min_i floor(n_i / 2)) with variable shots, or min(max_num_query, min_i n_i - s) with s fixed shots.
3. **Support size** (variable shots only). With r_i = n_i - q, c_i = min(max_support_size_contrib,
   r_i) and one beta ~ U[0, 1): S = min(max_support_set_size, sum_i floor(beta * c_i + 1)).
4. **Shots** (variable shots only). u_i ~ U(min_log_weight, max_log_weight), p_i ∝ n_i · exp(u_i),
   k_i = min(floor(p_i · (S - W)) + 1, r_i). Hence 1 <= k_i <= n_i - q and W <= sum k_i <= S.

Here n_i is the class's total number of images. The draws happen in exactly the official order
(google-research/meta-dataset @1676095, ``meta_dataset/data/sampling.py``) on a legacy
``np.random.RandomState``, so that a seed gives the official descriptions bit for bit; see
`EpisodeDescriptionSampler` for the seeding recipe. Errors carry the official messages.
"""

import numpy as np

from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import BiLevelDatasetSpecification, HierarchicalDatasetSpecification, Split

__all__ = [
    "MAX_SPANNING_LEAVES_ELIGIBLE",
    "sample_num_ways_uniformly",
    "sample_class_ids_uniformly",
    "compute_num_query",
    "sample_support_set_size",
    "sample_num_support_per_class",
    "EpisodeDescriptionSampler",
]

# An ImageNet DAG node is eligible when it spans between min_ways and this many leaves. 392 is the
# smallest cap at which every TRAIN leaf is spanned by some eligible node (official comment); larger
# nodes, whose spans approach the whole split, would make episodes far too coarse-grained.
MAX_SPANNING_LEAVES_ELIGIBLE = 392


def sample_num_ways_uniformly(num_classes, min_ways, max_ways, *, rng):
    """W ~ U{min_ways .. min(max_ways, num_classes)}: one ``randint`` draw.

    - no smaller than ``min_ways``;
    - no greater than ``max_ways`` nor the number of classes available.

    Raises:
        ValueError: ``max_ways`` is below ``min_ways`` (numpy's own "low >= high" would not say which setting).
    """
    if max_ways < min_ways:
        raise ValueError(f"max_ways_upper_bound={max_ways} is below min_ways={min_ways}; raise one or lower the other.")
    max_ways = min(max_ways, num_classes)
    return rng.randint(low=min_ways, high=max_ways + 1)


def sample_class_ids_uniformly(num_ways, rel_classes, *, rng):
    """``num_ways`` distinct classes of ``rel_classes`` (an int means ``range(int)``), uniformly.

    Draws ``permutation(len(rel_classes))`` and keeps its first ``num_ways`` entries, so the order
    returned is random and fixes which class gets which label.
    """
    return rng.choice(rel_classes, num_ways, replace=False)


def compute_num_query(images_per_class, max_num_query, num_support):
    """The per-class query size q shared by every class of the episode (no randomness).

    - variable shots (``num_support`` None): q = min(max_num_query, min_i floor(n_i / 2)), so at
      least half of every class is left for the support;
    - fixed shots s (or a range whose upper end is s): q = min(max_num_query, min_i n_i - s).

    Raises:
        ValueError: a class has fewer than 2 images (variable shots) or fewer than s + 1.
    """
    if num_support is None:
        if images_per_class.min() < 2:
            raise ValueError("Expected at least 2 images per class.")
        return np.minimum(max_num_query, (images_per_class // 2).min())
    max_support = num_support if isinstance(num_support, int) else num_support[1]
    if (images_per_class - max_support).min() < 1:
        raise ValueError(f"Expected at least {max_support + 1} images per class")
    return np.minimum(max_num_query, images_per_class.min() - max_support)


def sample_support_set_size(num_remaining_per_class, max_support_size_contrib_per_class, max_support_set_size, *, rng):
    """The total support size S: one ``uniform()`` draw beta.

    S = min(max_support_set_size, sum_i floor(beta · c_i + 1)) with c_i = min(contrib cap, r_i).
    ``floor(beta · c + 1)`` is the ceiling of (0, 1]-uniform times c, so each class contributes
    between 1 and c_i and S >= W whenever every r_i >= 1. The terms share beta (comonotone).

    Raises:
        ValueError: ``max_support_set_size`` is smaller than the number of ways.
    """
    if max_support_set_size < len(num_remaining_per_class):
        raise ValueError("max_support_set_size is too small to have at least one support example per class.")
    beta = rng.uniform()
    support_size_contributions = np.minimum(max_support_size_contrib_per_class, num_remaining_per_class)
    return np.minimum(np.floor(beta * support_size_contributions + 1).sum(), max_support_set_size)


def sample_num_support_per_class(images_per_class, num_remaining_per_class, support_set_size,
                                 min_log_weight, max_log_weight, *, rng):
    """Shots per class: one ``uniform(min_log_weight, max_log_weight, size=W)`` draw.

    k_i = min(floor(p_i · (S - W)) + 1, r_i) with p_i ∝ n_i · exp(u_i) (total images, not r_i).

    - every class gets at least one and at most r_i support examples;
    - W <= sum_i k_i <= S.

    Raises:
        ValueError: S < W, or some class has no image left after the query.
    """
    if support_set_size < len(num_remaining_per_class):
        raise ValueError("Requesting smaller support set than the number of ways.")
    if np.min(num_remaining_per_class) < 1:
        raise ValueError("Some classes have no remaining examples.")
    remaining_support_set_size = support_set_size - len(num_remaining_per_class)
    unnormalized_proportions = images_per_class * np.exp(
        rng.uniform(min_log_weight, max_log_weight, size=images_per_class.shape)
    )
    support_set_proportions = unnormalized_proportions / unnormalized_proportions.sum()
    num_desired_per_class = np.floor(support_set_proportions * remaining_support_set_size).astype("int32") + 1
    return np.minimum(num_desired_per_class, num_remaining_per_class)


class EpisodeDescriptionSampler:
    """Draws episode descriptions for one split of one source.

    Seeding (what makes two runs agree): the official code keeps a module-level
    ``sampling.RNG = RandomState(seed)`` and each sampler seeds its own ``RandomState`` with one
    draw ``RNG.randint(0, 2**32, dtype='uint32')`` at construction. `from_seed` does exactly that
    for a fresh module RNG, so ``from_seed(spec, split, config, S)`` yields the official sampler's
    stream for ``S`` (0 -> instance seed 2357136044, 1 -> 1791095845). The private seed does not
    depend on the split: two splits of equal class counts and sizes give identical descriptions.

    Per episode the draws are, in order: one ``random_sample()`` for the hierarchy coin when an
    ontology is on; the class draw (DAG: ``randint`` node [+ ``permutation`` subsample]; bilevel:
    ``randint`` superclass, ``randint`` ways, ``permutation``; flat: [``randint`` ways],
    ``permutation``); ``randint`` shots for a range ``num_support``; ``uniform`` beta and
    ``uniform(size=W)`` log-weights for variable shots.

    Args:
        dataset_spec: any of the three spec kinds.
        split: the `Split` to sample classes from.
        config: an `EpisodeDescriptionConfig`.
        rng: the sampler's own ``np.random.RandomState``.
        use_dag_hierarchy, use_bilevel_hierarchy: None (default) follows the spec kind, as the
            official trainer does for ``ilsvrc_2012*`` and ``omniglot``; ``config.ignore_*_ontology``
            switches them off.

    Raises:
        ValueError: with the official message, for inputs the official sampler rejects.
    """

    def __init__(self, dataset_spec, split, config, *, rng, use_dag_hierarchy=None, use_bilevel_hierarchy=None):
        self.dataset_spec = dataset_spec
        self.split = Split.parse(split)
        self.config = config
        self._rng = rng
        if use_dag_hierarchy is None:
            use_dag_hierarchy = isinstance(dataset_spec, HierarchicalDatasetSpecification)
        if use_bilevel_hierarchy is None:
            use_bilevel_hierarchy = isinstance(dataset_spec, BiLevelDatasetSpecification)
        self.use_dag_hierarchy = use_dag_hierarchy and not config.ignore_dag_ontology
        self.use_bilevel_hierarchy = use_bilevel_hierarchy and not config.ignore_bilevel_ontology
        self.ignore_hierarchy_probability = config.ignore_hierarchy_probability

        self.class_set = dataset_spec.get_classes(self.split)
        self._filtered_class_set = [
            c for c in self.class_set if dataset_spec.get_total_images_per_class(c) >= config.min_examples_in_class
        ]
        if config.min_ways and len(self._filtered_class_set) < config.min_ways:
            raise ValueError(
                f'"min_ways" is set to {config.min_ways}, but split {self.split} of dataset '
                f"{dataset_spec.name} only has {len(self._filtered_class_set)} classes with at least "
                f"{config.min_examples_in_class} examples ({len(self.class_set)} total), so it is not "
                "possible to create an episode for it. This may have resulted from applying a "
                "restriction on this split of this dataset by specifying benchmark.restrict_classes "
                "or benchmark.min_examples_in_class."
            )
        if self.use_bilevel_hierarchy and self.use_dag_hierarchy:
            raise ValueError('"use_bilevel_hierarchy" is incompatible with "use_dag_hierarchy".')
        if self.use_bilevel_hierarchy:
            self.superclass_set = self._eligible_superclasses()
        elif self.use_dag_hierarchy:
            self.span_leaves_rel = self._eligible_dag_spans()

    @classmethod
    def from_seed(cls, dataset_spec, split, config, seed, **kwargs):
        """The sampler the official code builds after ``sampling.RNG = RandomState(seed)``."""
        module_rng = np.random.RandomState(seed)
        instance_seed = module_rng.randint(0, 2**32, dtype="uint32")
        return cls(dataset_spec, split, config, rng=np.random.RandomState(instance_seed), **kwargs)

    def _eligible_superclasses(self):
        """Superclasses of the split; each must have at least ``min_ways`` classes."""
        config, spec = self.config, self.dataset_spec
        if config.num_ways is not None:
            raise ValueError('"use_bilevel_hierarchy" is incompatible with "num_ways".')
        if config.min_examples_in_class > 0:
            raise ValueError('"use_bilevel_hierarchy" is incompatible with "min_examples_in_class".')
        if not isinstance(spec, BiLevelDatasetSpecification):
            raise ValueError("Only applicable to datasets with a bi-level dataset specification.")
        for superclass in spec.get_superclasses(self.split):
            num_classes = spec.classes_per_superclass[superclass]
            if num_classes < config.min_ways:
                raise ValueError(
                    f"Superclass: {superclass} has num_classes={num_classes} < min_ways={config.min_ways}."
                )
        return list(spec.get_superclasses(self.split))

    def _eligible_dag_spans(self):
        """Relative ids of the (filtered) leaves spanned by each eligible internal node.

        Internal nodes are taken in wn_id order and their leaves in wn_id order; a node is eligible
        when it spans between ``min_ways`` and `MAX_SPANNING_LEAVES_ELIGIBLE` filtered leaves. The
        spans are held in a 1-D object array: the official code passes a ragged list to
        ``rng.choice``, which numpy >= 1.24 rejects; an object array draws the same single
        ``randint(0, #nodes)``, so the random stream is unchanged.
        """
        config, spec = self.config, self.dataset_spec
        if config.num_ways is not None:
            raise ValueError('"use_dag_hierarchy" is incompatible with "num_ways".')
        if not isinstance(spec, HierarchicalDatasetSpecification):
            raise ValueError("Only applicable to datasets with a hierarchical dataset specification.")
        filtered = set(self._filtered_class_set)
        offset = self.class_set[0] if len(self.class_set) else 0
        spans = []
        for _, leaves in spec.spanning_leaves(self.split):
            abs_ids = (spec.class_names_to_ids[wn] for wn in leaves)
            ids_rel = [abs_id - offset for abs_id in abs_ids if abs_id in filtered]
            if config.min_ways <= len(ids_rel) <= MAX_SPANNING_LEAVES_ELIGIBLE:
                spans.append(ids_rel)
        if not spans:
            raise ValueError(
                "There are no classes eligible for participating in episodes. Consider changing the "
                "value of `EpisodeDescriptionSampler.min_ways` in gin, or or "
                "MAX_SPANNING_LEAVES_ELIGIBLE in data.py."
            )
        span_array = np.empty(len(spans), dtype=object)
        span_array[:] = spans
        return span_array

    def sample_class_ids(self):
        """Relative class ids of one episode, in label order (step 1 of the module docstring)."""
        config, rng = self.config, self._rng
        prob = [1.0 - self.ignore_hierarchy_probability, self.ignore_hierarchy_probability]
        if self.use_dag_hierarchy and rng.choice([True, False], p=prob):
            episode_classes_rel = rng.choice(self.span_leaves_rel)
            if len(episode_classes_rel) > config.max_ways_upper_bound:
                episode_classes_rel = rng.choice(
                    episode_classes_rel, size=[config.max_ways_upper_bound], replace=False
                )
            if not config.min_ways <= len(episode_classes_rel) <= config.max_ways_upper_bound:
                raise ValueError(
                    f"max_ways_upper_bound={config.max_ways_upper_bound} is below min_ways={config.min_ways}."
                )
            return list(episode_classes_rel)
        if self.use_bilevel_hierarchy and rng.choice([True, False], p=prob):
            spec = self.dataset_spec
            superclass = rng.choice(self.superclass_set, 1)[0]
            num_superclass_classes = spec.classes_per_superclass[superclass]
            num_ways = sample_num_ways_uniformly(
                num_superclass_classes, config.min_ways, config.max_ways_upper_bound, rng=rng
            )
            subclass_ids = sample_class_ids_uniformly(num_ways, num_superclass_classes, rng=rng)
            first_rel = spec.class_offset_of_superclass(superclass) - self.class_set[0]
            return list(first_rel + subclass_ids)
        if config.num_ways is not None:
            num_ways = config.num_ways
        else:
            num_ways = sample_num_ways_uniformly(
                len(self._filtered_class_set), config.min_ways, config.max_ways_upper_bound, rng=rng
            )
        ids_rel = [class_id - self.class_set[0] for class_id in self._filtered_class_set]
        return list(sample_class_ids_uniformly(num_ways, ids_rel, rng=rng))

    def sample_episode_description(self):
        """One description: a tuple of ``(relative_class_id, num_support, num_query)`` ints."""
        config, rng = self.config, self._rng
        class_ids = self.sample_class_ids()
        images_per_class = np.array(
            [self.dataset_spec.get_total_images_per_class(self.class_set[c]) for c in class_ids]
        )
        if config.num_query is not None:
            num_query = config.num_query
        else:
            num_query = compute_num_query(images_per_class, config.max_num_query, config.num_support)

        if isinstance(config.num_support, int):
            if any(config.num_support + num_query > images_per_class):
                raise ValueError("Some classes do not have enough examples.")
            num_support_per_class = [config.num_support] * len(class_ids)
        elif config.num_support is not None:
            start, end = config.num_support
            if any(end + num_query > images_per_class):
                raise ValueError(
                    "The range provided for uniform sampling of the number of support examples per "
                    "class is not valid: some classes do not have enough examples."
                )
            num_support_per_class = [rng.randint(low=start, high=end + 1)] * len(class_ids)
        else:
            num_remaining_per_class = images_per_class - num_query
            support_set_size = sample_support_set_size(
                num_remaining_per_class,
                config.max_support_size_contrib_per_class,
                config.max_support_set_size,
                rng=rng,
            )
            num_support_per_class = sample_num_support_per_class(
                images_per_class,
                num_remaining_per_class,
                support_set_size,
                config.min_log_weight,
                config.max_log_weight,
                rng=rng,
            )
        return tuple(
            (int(class_id), int(num_support), int(num_query))
            for class_id, num_support in zip(class_ids, num_support_per_class)
        )

    def __iter__(self):
        """Descriptions forever, in stream order (stops at the first error, which propagates)."""
        while True:
            yield self.sample_episode_description()
