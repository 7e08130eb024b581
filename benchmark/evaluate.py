"""Meta-testing: every test source of a benchmark, with each adapter, on the benchmark's fixed test episodes.

For each (source, adapter):

1. **Learning rate.** Adapters that fine-tune (``full``, ``lora``, ``full_joint``) pick their lr from
   a grid (default SMAT's {0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}) by mean query accuracy on
   labelled VALID-split episodes (seed = the benchmark's), never on a test image: ``search_episodes``
   of the source's own where it has validation classes, else ``search_episodes`` of each of the
   benchmark's validation sources (one search, shared by every source without validation classes:
   most OOD sets). Ties keep the smaller lr; a one-value grid is taken as given. The choice is kept
   in ``RUN_DIR/lr_search.json`` and its value and basis are written into every row.
2. **Episodes** ``0 .. n−1`` of the TEST split (n = the benchmark's ``test_episodes``) — the same
   episodes for every method — skipping those already in ``episodes.jsonl`` (resume).
   With several processes, episodes are dealt out round by round and rank 0 writes every row.
3. **A row per episode** (contract C3) as soon as it finishes, with the wall seconds of adaptation
   plus prediction and the peak GPU memory (null on CPU), the episode's digest
   (`benchmark.episodes.SourceRecords.episode_digest`: which images, by content) and what the method
   adds about the task (`methods.Method.describe_task`, e.g. SMAT's routing weights).
"""

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmark import distributed
from benchmark.episodes import episode_loader
from benchmark.files import write_json
from benchmark.results import mean_ci, row_key
from methods.adapters import get_adapter, searches_lr, seeded_generator
from methods.base import Task
from registry.dataset_spec import Split
from registry.errors import DataError

__all__ = ["evaluate", "choose_lr", "DEFAULT_LR_GRID"]

DEFAULT_LR_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _accuracy(predictions, labels):
    return float((predictions.cpu() == labels.cpu()).float().mean())


def adapt_and_score(method, adapter, episode, lr, device, task=None):
    """(accuracy, seconds, peak MiB or None) of one adapted episode; randomness seeded by its identity.

    ``task`` is the episode already on ``device``, when the caller has it.
    """
    task = task if task is not None else Task.from_episode(episode, device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    predictions = adapter(method, task, lr, seeded_generator(*vars(episode.id).values(), adapter.__name__))
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return _accuracy(predictions, task.query_y), seconds, peak


def search_basis(data, source, search_episodes):
    """(sources, description) of the lr search of ``source``: the sources whose VALID-split episodes
    0 .. ``search_episodes`` − 1 choose its lr (itself, or for a source without validation classes the
    benchmark's validation sources, which then stand for every such source).

    Raises:
        DataError: neither ``source`` nor any validation source has validation classes.
    """
    bench = data.benchmark
    min_ways = bench.config_for(Split.VALID).min_ways

    def has_valid(name):
        return data.source(name).source.classes["valid"] >= min_ways

    sources = [source] if has_valid(source) else [s.name for s in bench.valid_sources if has_valid(s.name)]
    if not sources:
        raise DataError(f"source {source!r} has no validation classes, nor has any validation source of benchmark "
                        f"{bench.name!r}: a learning rate could only be chosen on test images; bind one, e.g. "
                        "run.lr_grid = (1e-4,)")
    where = "" if sources == [source] else " (validation sources; this source has no validation classes)"
    return sources, (f"valid split of {', '.join(sources)}{where}, seed {bench.seed}, "
                     f"episodes 0-{search_episodes - 1}")


def choose_lr(method, adapter_name, data, source, grid, search_episodes, device, cache_file=None):
    """(lr, basis) for ``adapter_name`` on ``source``: the grid value with the best mean validation accuracy
    on the episodes `search_basis` names.

    With several processes every one searches (or reads the kept choice) and all take rank 0's choice,
    so the rows of a source carry one lr even where GPU nondeterminism would break a tie differently."""
    if not searches_lr(adapter_name):
        return None, "no learning rate"
    if len(grid) == 1:
        return grid[0], "the only value of run.lr_grid"
    cache = json.loads(Path(cache_file).read_text()) if cache_file and Path(cache_file).exists() else {}
    key = f"{adapter_name}/{source}"  # runs begun before searches were shared kept every source's choice here
    if key not in cache:
        sources, basis = search_basis(data, source, search_episodes)
        key = f"{adapter_name}/{'+'.join(sources)}"
    if key in cache:
        return distributed.gather_objects((cache[key]["lr"], cache[key]["basis"]))[0]
    searched = [data.eval_episodes(name, Split.VALID, num_episodes=search_episodes) for name in sources]
    adapter = get_adapter(adapter_name, method)
    best_lr, best_acc, scores = None, -1.0, {}
    for lr in sorted(grid):  # ascending, so a tie keeps the smaller lr
        accs = [adapt_and_score(method, adapter, episodes[i], lr, device)[0]
                for episodes in searched for i in range(search_episodes)]
        scores[str(lr)] = sum(accs) / len(accs)
        if scores[str(lr)] > best_acc:
            best_lr, best_acc = lr, scores[str(lr)]
    basis = f"grid search on {basis}"
    if cache_file and distributed.is_main():
        cache[key] = {"lr": best_lr, "basis": basis, "accuracy_by_lr": scores}
        write_json(cache_file, cache, sort_keys=True)
    return distributed.gather_objects((best_lr, basis))[0]


def evaluate(method, data, adapters, store, run_info, device="cpu", lr_grid=DEFAULT_LR_GRID, search_episodes=5,
             num_episodes=None, workers=0, lr_cache=None, progress=True):
    """Meta-test ``method`` on every test source of ``data`` with each adapter; rows go to ``store``.

    Args:
        method: a `methods.Method`.
        data: a `benchmark.episodes.BenchmarkData`.
        adapters: adapter names (`methods.adapters.ADAPTERS`).
        store: a `benchmark.results.ResultsStore`; episodes whose rows are there are skipped.
        run_info: the run's fields of every row (run_id, method, variant, backbone, config_hash, ...).
        num_episodes: test episodes per source (default: the benchmark's).
        workers: DataLoader processes decoding episodes.
        lr_cache: ``lr_search.json`` path that keeps lr choices across a resume.

    Returns:
        {(adapter, source): (mean accuracy, 95% CI half-width, episodes)} over the store's rows.
    """
    method.eval()
    bench = data.benchmark
    for adapter_name in adapters:
        get_adapter(adapter_name, method)  # fail before any work on an adapter that does not apply
    summary = {}
    cuda = torch.device(device).type == "cuda"  # pinned episodes, non-blocking copies
    for source in bench.test_sources:
        episodes = data.eval_episodes(source.name, Split.TEST, num_episodes=num_episodes)
        described = {}  # episode -> what the method adds to its rows, and its digest (the same for all adapters)
        for adapter_name in adapters:
            adapter = get_adapter(adapter_name, method)
            lr, basis = choose_lr(method, adapter_name, data, source.name, lr_grid, search_episodes, device, lr_cache)
            todo = [i for i in range(len(episodes)) if row_key(dict(
                run_info, adaptation=adapter_name, source=source.name, split="test", seed=episodes.seed, episode=i)
            ) not in store]
            world, rank = distributed.world_size(), distributed.rank()
            rounds = range(0, len(todo), world)  # round r: process p takes episode todo[r + p]
            loader = iter(episode_loader(torch.utils.data.Subset(episodes, todo[rank::world]), workers, cuda))
            for start in tqdm(rounds, desc=f"{source.name} {adapter_name}", file=sys.stderr, leave=False,
                              disable=not (progress and distributed.is_main())):
                row = None
                if start + rank < len(todo):
                    episode = next(loader)
                    task = Task.from_episode(episode, device)
                    accuracy, seconds, peak = adapt_and_score(method, adapter, episode, lr, device, task)
                    if episode.id.episode not in described:
                        described[episode.id.episode] = dict(
                            method.describe_task(task.support_x, task.support_y, task.ways),
                            episode_digest=data.source(source.name).episode_digest(episode))
                    row = {
                        **described[episode.id.episode],
                        **run_info, "adaptation": adapter_name, "benchmark": bench.name, "source": source.name,
                        "role": source.role, "split": "test", "seed": episode.id.seed, "episode": episode.id.episode,
                        "ways": episode.ways, "support": len(episode.support_labels),
                        "query": len(episode.query_labels), "accuracy": accuracy, "seconds": seconds,
                        "peak_memory_mib": peak, "lr": lr, "lr_basis": basis,
                    }
                for gathered in distributed.gather_objects(row):
                    if gathered is not None and distributed.is_main():
                        store.append(gathered)
            accs = [r["accuracy"] for r in store.rows if r["source"] == source.name and r["adaptation"] == adapter_name]
            if accs:  # only the writing process holds the rows
                summary[(adapter_name, source.name)] = (*mean_ci(accs), len(accs))
    return summary

