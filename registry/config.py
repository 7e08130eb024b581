"""`EpisodeDescriptionConfig`: the official Meta-Dataset episode configuration, as a frozen dataclass.

Field names and defaults are those of ``meta_dataset/learn/gin/setups/data_config_common.gin`` and
``variable_way_and_shot.gin`` (google-research/meta-dataset @1676095). ``None`` means "not fixed":
the sampler draws that quantity per episode.
"""

import math
from dataclasses import dataclass, fields
from numbers import Integral

from registry.errors import DataError

__all__ = ["EpisodeDescriptionConfig"]

# The smallest value of each count and size field (None, where a field allows it, stays "not fixed").
_AT_LEAST = {
    "num_ways": 1, "num_support": 1, "num_query": 1, "min_ways": 1, "max_ways_upper_bound": 1, "max_num_query": 1,
    "max_support_set_size": 1, "max_support_size_contrib_per_class": 1, "min_examples_in_class": 0,
    "episode_description_switch_frequency": 1,
}
_VARIABLE = ("num_ways", "num_support", "num_query")  # None = drawn per episode


@dataclass(frozen=True)
class EpisodeDescriptionConfig:
    """How the episode sampler draws ways, shots and query sizes.

    Attributes:
        num_ways: fixed number of classes per episode; None = variable way, W ~ U{min_ways..
            min(max_ways_upper_bound, #classes)} (or the ontology's choice for DAG/bilevel sources).
        num_support: fixed shots per class (int), a range ``(lo, hi)`` drawn once per episode, or
            None = variable shot (support size S then per-class shots, see `registry.sampling`).
        num_query: fixed query examples per class; None = min(max_num_query, min_i floor(n_i / 2))
            (or min(max_num_query, min_i n_i - num_support) when the support is fixed).
        min_ways: smallest number of ways; also the minimum number of leaves an ImageNet DAG node
            must span and the minimum size of an Omniglot alphabet.
        max_ways_upper_bound: largest number of ways; DAG nodes spanning more leaves are subsampled.
        max_num_query: cap on the per-class query size when it is variable.
        max_support_set_size: cap on the total support size S when shots are variable.
        max_support_size_contrib_per_class: cap on one class's contribution to S.
        min_log_weight, max_log_weight: per-class log-weights u_i ~ U(min, max) that jitter the
            shot proportions p_i ∝ n_i · exp(u_i); defaults ±ln 2.
        ignore_dag_ontology: sample ImageNet classes flat instead of from DAG nodes.
        ignore_bilevel_ontology: sample Omniglot characters flat instead of within one alphabet.
        ignore_hierarchy_probability: probability of sampling flat although an ontology is on.
        simclr_episode_fraction: fraction of SimCLR episodes (pipeline option; only 0 is supported).
        min_examples_in_class: classes with fewer images are never sampled.
        num_unique_descriptions: replay this many pre-drawn descriptions (pipeline option; only 0).
        episode_description_switch_frequency: reuse each description this many times (pipeline option).

    Raises:
        DataError: a count or size below its minimum (ways, shots, queries and sizes at least 1), a non-finite
            log-weight, or fields that contradict each other; the message names the field and the fix.
    """

    num_ways: int | None = None
    num_support: int | tuple[int, int] | None = None
    num_query: int | None = None
    min_ways: int = 5
    max_ways_upper_bound: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2)
    ignore_dag_ontology: bool = False
    ignore_bilevel_ontology: bool = False
    ignore_hierarchy_probability: float = 0.0
    simclr_episode_fraction: float = 0.0
    min_examples_in_class: int = 0
    num_unique_descriptions: int = 0
    episode_description_switch_frequency: int = 1

    def __post_init__(self):
        for name, least in _AT_LEAST.items():
            value = getattr(self, name)
            if value is None or (name == "num_support" and not isinstance(value, int)):  # unset, or a range
                continue
            if not isinstance(value, Integral) or value < least:
                unset = " or leave it unset (drawn per episode)" if name in _VARIABLE else ""
                raise DataError(f"{name} is {value!r}; give an integer of at least {least}{unset}")
        for name in ("min_log_weight", "max_log_weight"):
            if not math.isfinite(getattr(self, name)):
                raise DataError(f"{name} is {getattr(self, name)}; give a finite number (default ±ln 2 = ±0.693)")
        # The official sampler treats any non-int num_support as a (lo, hi) range; keep that
        # distinction explicit here so that a numpy integer or a list cannot change the meaning.
        support = self.num_support
        if support is not None and not isinstance(support, int):
            try:
                lo, hi = (int(v) for v in support)
            except (TypeError, ValueError):
                raise DataError(
                    f"num_support={support!r}: give an int (fixed shots) or a pair (lo, hi)"
                ) from None
            if not 0 < lo <= hi:
                raise DataError(f"num_support range {support!r} must satisfy 0 < lo <= hi")
            object.__setattr__(self, "num_support", (lo, hi))
        if self.min_log_weight > self.max_log_weight:
            raise DataError(
                f"min_log_weight ({self.min_log_weight}) must not exceed max_log_weight ({self.max_log_weight})"
            )
        if not 0.0 <= self.ignore_hierarchy_probability <= 1.0:
            raise DataError("ignore_hierarchy_probability must lie in [0, 1]")
        for name in ("simclr_episode_fraction", "num_unique_descriptions"):
            if getattr(self, name):
                raise DataError(f"{name} is a pipeline option that smat-bench does not implement; leave it at 0")

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]

    def replace(self, **overrides):
        """A copy with ``overrides`` applied; ``None`` values leave the field alone (unset flags)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(overrides) - set(values)
        if unknown:
            raise DataError(
                f"unknown episode config field(s) {sorted(unknown)}; valid: {', '.join(values)}"
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return type(self)(**values)
