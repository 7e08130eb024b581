"""``python -m registry.episodes``: print official episode descriptions for a spec, split and seed.

Contract C1 (DESIGN.md). Each printed line is one episode, a JSON list of
``[relative_class_id, num_support, num_query]`` triples in the sampler's order; with the default
config, seed ``S`` gives exactly the official sampler's descriptions after
``sampling.RNG = RandomState(S)``. Every `EpisodeDescriptionConfig` field has a flag
(``--num-ways``, ``--min-log-weight``, ...); an unset flag keeps the official default. An input the
official sampler rejects exits 2 with a one-line message, after the episodes sampled before it.

This module imports numpy only (no torch), so it starts fast.

Example:
    python -m registry.episodes --spec records/aircraft --split test --seed 0 --episodes 3
"""

import argparse
import dataclasses
import json
import os
import sys

from registry.config import EpisodeDescriptionConfig
from registry.dataset_spec import load_dataset_spec
from registry.errors import CommandParser, DataError, exit_on_error
from registry.sampling import EpisodeDescriptionSampler

PROG = "python -m registry.episodes"


def parse_num_support(text):
    """``'5'`` -> 5 (fixed shots); ``'2,8'`` or ``'2-8'`` -> (2, 8) (a range drawn per episode)."""
    parts = text.replace("-", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or LO,HI, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise argparse.ArgumentTypeError(f"expected K or LO,HI, got {text!r}")


def add_config_flags(parser):
    """One flag per `EpisodeDescriptionConfig` field (``num_ways`` -> ``--num-ways``), default unset."""
    for f in dataclasses.fields(EpisodeDescriptionConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is False:
            parser.add_argument(flag, action="store_true", default=None, help=f"set {f.name} (default off)")
        elif f.name == "num_support":
            parser.add_argument(flag, type=parse_num_support, help="fixed shots K, or a range LO,HI")
        else:
            kind = float if isinstance(f.default, float) else int
            parser.add_argument(flag, type=kind, help=f"{f.name} (default {f.default})")


def config_from_args(args):
    """The default config with every flag that was given applied."""
    names = EpisodeDescriptionConfig.field_names()
    return EpisodeDescriptionConfig().replace(**{n: getattr(args, n) for n in names})


def build_parser():
    parser = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="source directory holding dataset_spec.json, or the file")
    parser.add_argument("--split", required=True, type=str.lower, choices=["train", "valid", "test"])
    parser.add_argument("--seed", required=True, type=int, help="seed of the official module RNG")
    parser.add_argument("--episodes", required=True, type=int, help="number of descriptions to print")
    add_config_flags(parser)
    return parser


def main(argv=None):
    """The CLI. A reader that stops early (``| head``) ends it quietly with status 1, as Python's docs on
    SIGPIPE advise: stdout goes to devnull so that the interpreter's last flush does not fail too."""
    args = build_parser().parse_args(argv)
    try:
        with exit_on_error(PROG):
            if args.episodes < 1:
                raise DataError(f"--episodes is {args.episodes}; give the number of descriptions to print (at least 1)")
            if not 0 <= args.seed < 2**32:
                raise DataError(f"--seed is {args.seed}; give an integer from 0 to 2**32 - 1 (a RandomState seed)")
            spec = load_dataset_spec(args.spec)
            sampler = EpisodeDescriptionSampler.from_seed(spec, args.split, config_from_args(args), args.seed)
            for _ in range(args.episodes):
                description = sampler.sample_episode_description()
                sys.stdout.write(json.dumps([list(t) for t in description], separators=(",", ":")) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
