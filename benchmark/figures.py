"""The leaderboard's figure stage: SMAT's Fig. 3 and Fig. 6 from run directories, as deterministic PNGs.

- ``fig3_tradeoff__{benchmark}__{backbone}.png`` (Fig. 3): one point per SMAT run, (ID Avg, OOD Avg)
  of its ProtoNet rows; colour = expert sparsity τ (``smat.target_sparsity``), marker = number of
  experts M (``smat.num_experts``), both read from the run's ``config.gin``.
- ``fig6ab_density__{run}.png`` (Fig. 6a, b): the fraction of non-zero gates per layer type and per
  block, from ``method_report.json``: for expert m and a group G of tensors,
  density_m(G) = Σ_{t∈G} numel_t · density_{t,m} / Σ_{t∈G} numel_t; bars are the mean over experts,
  error bars their std (ddof 0).
- ``fig6d_overlap__{run}.png`` (Fig. 6d): the experts' mask overlap |z_i ∩ z_j| / |z_i ∪ z_j|.
- ``fig6c_routing__{run}.png`` (Fig. 6c): test sources clustered (average linkage, Euclidean) by
  their mean routing weights α over the run's episodes (``routing_weights`` of the rows, one per
  episode whatever the adapter), beside the weights themselves.

Figures are per run even with ``--merge-runs`` (τ, M, masks and routing belong to one run). Drawing
uses matplotlib's default style whatever the user's matplotlibrc, a fixed size and dpi, and no
"Software" PNG metadata, so the same inputs give the same bytes. What the run directories lack is
skipped with a note in the index, never drawn from nothing.
"""

import io
import json
import re

import matplotlib
import numpy as np
from matplotlib import style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.cluster import hierarchy

from benchmark.leaderboard import (EPISODE_KEYS, Product, benchmark_sources, gin_value, safe_name, short_run_ids,
                                   skipped)
from registry.errors import DataError

__all__ = ["render_figures", "density_by", "layer_type", "block_depth", "mean_routing_weights"]

DPI = 100
LAYER_TYPES = (  # (label, test on a timm ViT parameter name), in plot order
    ("patch embed", lambda name: name.startswith("patch_embed.")),
    ("pos embed", lambda name: name == "pos_embed"),
    ("cls token", lambda name: name == "cls_token"),
    ("attn qkv", lambda name: ".attn.qkv." in name),
    ("attn proj", lambda name: ".attn.proj." in name),
    ("MLP fc1", lambda name: ".mlp.fc1." in name),
    ("MLP fc2", lambda name: ".mlp.fc2." in name),
    ("LayerNorm", lambda name: re.search(r"(^|\.)norm\d?\.", name) is not None),
)
MARKERS = "osD^vP*Xph"


# --- inputs --------------------------------------------------------------------------------------------


def read_report(path):
    """A run's ``method_report.json``; a corrupt one is a `DataError` naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable method report ({err})") from None


def layer_type(name):
    """The layer-type label of a timm ViT parameter name (``other`` when none fits)."""
    return next((label for label, test in LAYER_TYPES if test(name)), "other")


def block_depth(name):
    """The block index of ``blocks.{i}.…``, None outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def density_by(tensors, group_of):
    """{group: per-expert density} over the tensors whose ``group_of(name)`` is not None, numel-weighted."""
    totals = {}
    for name in sorted(tensors):
        group = group_of(name)
        if group is None:
            continue
        numel, density = tensors[name]["numel"], np.asarray(tensors[name]["density"], dtype=float)
        count, kept = totals.get(group, (0, 0.0))
        totals[group] = (count + numel, kept + numel * density)
    return {group: kept / count for group, (count, kept) in totals.items()}


def mean_routing_weights(rows, benchmark):
    """(sources in benchmark order, matrix of mean α per source) over distinct episodes with routing weights."""
    rows = rows[rows["routing_weights"].notna()].drop_duplicates(subset=list(EPISODE_KEYS))
    order = [name for name, _ in benchmark_sources(benchmark)[0] if name in set(rows["source"])]
    means = [np.mean(np.stack(rows.loc[rows["source"] == s, "routing_weights"].map(np.asarray).tolist()), axis=0)
             for s in order]
    return order, np.array(means)


# --- drawing -------------------------------------------------------------------------------------------


def png(figure):
    """The PNG bytes of ``figure`` at a fixed dpi, without the version-stamping "Software" metadata."""
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def drawn(filename, heading, figure, run_ids):
    """A figure `Product`: its PNG, indexed under its (two-line) heading joined into one line."""
    return Product("figure", filename, " — ".join(heading.splitlines()), png(figure), tuple(run_ids))


def plot_tradeoff(points, title):
    """Fig. 3: ID Avg vs OOD Avg per run; colour τ, marker M. ``points``: (label, id, ood, τ, M) in percent."""
    figure = Figure(figsize=(6.4, 4.8))
    ax = figure.add_subplot()
    taus = sorted({p[3] for p in points})
    experts = sorted({p[4] for p in points})
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(taus)))
    for label, id_avg, ood_avg, tau, m in points:
        ax.scatter(id_avg, ood_avg, color=colours[taus.index(tau)], marker=MARKERS[experts.index(m) % len(MARKERS)],
                   s=60, edgecolors="black", linewidths=0.5)
        ax.annotate(label, (id_avg, ood_avg), textcoords="offset points", xytext=(4, 4), fontsize=7)
    handles = [ax.scatter([], [], color=c, marker="o", label=f"τ = {t:g}") for t, c in zip(taus, colours)]
    handles += [ax.scatter([], [], color="grey", marker=MARKERS[i % len(MARKERS)], label=f"M = {m}")
                for i, m in enumerate(experts)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.margins(0.12)
    ax.set(xlabel="ID Avg accuracy (%)", ylabel="OOD Avg accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_density(tensors, title):
    """Fig. 6a, b: mean (± std over experts) density of the gates by layer type and by block depth."""
    by_type = density_by(tensors, layer_type)
    types = [label for label, _ in LAYER_TYPES if label in by_type] + (["other"] if "other" in by_type else [])
    by_depth = density_by(tensors, block_depth)
    depths = sorted(by_depth)
    figure = Figure(figsize=(10, 4))
    for position, (groups, values, xlabel, panel) in enumerate((
            (types, [by_type[g] for g in types], "layer type", "(a)"),
            ([str(d) for d in depths], [by_depth[d] for d in depths], "block", "(b)")), 1):
        ax = figure.add_subplot(1, 2, position)
        if groups:
            ax.bar(groups, [v.mean() for v in values], yerr=[v.std() for v in values], capsize=3, color="tab:blue")
        ax.set(ylim=(0, 1.05), xlabel=xlabel, ylabel="non-zero gates (fraction)", title=f"{panel} by {xlabel}")
        ax.tick_params(axis="x", labelrotation=45 if position == 1 else 0, labelsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def plot_overlap(overlap, title):
    """Fig. 6d: the M×M Jaccard overlap of the experts' masks, values written in the cells."""
    matrix = np.asarray(overlap, dtype=float)
    figure = Figure(figsize=(5.6, 4.8))
    ax = figure.add_subplot()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    figure.colorbar(image, ax=ax, label="|z_i ∩ z_j| / |z_i ∪ z_j|")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ticks = range(len(matrix))
    ax.set(xticks=ticks, yticks=ticks, xlabel="expert", ylabel="expert")
    ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def plot_routing(sources, weights, title):
    """Fig. 6c: dendrogram of sources by mean routing weights, beside the weights in dendrogram order."""
    links = hierarchy.linkage(weights, method="average", metric="euclidean")
    figure = Figure(figsize=(9, 0.4 * len(sources) + 1.8))
    tree, heat = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    leaves = hierarchy.dendrogram(links, ax=tree, orientation="left", labels=sources, color_threshold=0,
                                  above_threshold_color="black", leaf_font_size=9)["leaves"]
    tree.set(xlabel="distance", title="(c) sources by routing")
    image = heat.imshow(weights[leaves[::-1]], aspect="auto", cmap="viridis", vmin=0)  # top row = top leaf
    heat.set(yticks=[], xticks=range(weights.shape[1]), xlabel="expert", title="mean routing weight α")
    figure.colorbar(image, ax=heat, label="α")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


# --- which figures the inputs allow -------------------------------------------------------------------


def role_sources(benchmark, role):
    return [name for name, r in benchmark_sources(benchmark)[0] if r == role]


def tradeoff_point(series, tau, experts):
    """(ID Avg, OOD Avg, τ, M) of a SMAT ProtoNet series in percent; None unless both averages cover all
    their sources with all their episodes (a run still evaluating, or one that stopped, is not a point)."""
    id_cell = series.cell(role_sources(series.benchmark, "id"))
    ood_cell = series.cell(role_sources(series.benchmark, "ood"))
    whole = id_cell and ood_cell and not any(c.partial or c.incomplete for c in (id_cell, ood_cell))
    return (100 * id_cell.mean, 100 * ood_cell.mean, tau, experts) if whole else None


def tradeoff_figures(results):
    """Fig. 3 products, one per (benchmark, backbone) with SMAT ProtoNet runs (the default variant; the
    Table 2 ablations are not points of its τ/M trade-off) whose config.gin names τ and M."""
    groups, lacking = {}, []
    for s in results.series(merge_runs=False):
        if (s.method, s.variant, s.adaptation) != ("smat", "default", "protonet"):
            continue
        config = results.run_dirs[s.run_ids[0]] / "config.gin"
        text = config.read_text() if config.is_file() else ""
        tau, experts = gin_value(text, "smat.target_sparsity"), gin_value(text, "smat.num_experts")
        point = tradeoff_point(s, tau, experts) if tau is not None and experts is not None else None
        if point:
            groups.setdefault((s.benchmark, s.backbone), []).append((s.run_ids[0], point))
        else:
            lacking.append(s.run_ids[0])
    products = []
    for (bench, backbone), found in sorted(groups.items()):
        run_ids = [run_id for run_id, _ in found]
        points = [(label, *point) for label, (_, point) in zip(short_run_ids(run_ids), found)]
        heading = f"SMAT ID vs OOD trade-off (ProtoNet)\n{bench} · {backbone}"
        products.append(drawn(f"fig3_tradeoff__{safe_name(bench)}__{safe_name(backbone)}.png", heading,
                              plot_tradeoff(points, heading), sorted(run_ids)))
    if lacking or not products:
        runs = f"SMAT run(s) {', '.join(lacking)} left out" if lacking else "no SMAT run with ProtoNet rows"
        products.append(skipped("figure", "fig3_tradeoff__*.png", "SMAT ID vs OOD trade-off (Fig. 3)",
                                f"{runs}: a point needs ProtoNet rows on every ID and OOD source and "
                                "smat.target_sparsity and smat.num_experts in the run's config.gin"))
    return products


def report_figures(results):
    """Fig. 6a, b and 6d products from every run directory's ``method_report.json`` that has masks."""
    by_dir = {}
    for run_id, directory in sorted(results.run_dirs.items()):
        by_dir.setdefault(directory, []).append(run_id)
    products = []
    for directory, run_ids in sorted(by_dir.items(), key=lambda item: item[1]):
        path = directory / "method_report.json"
        if not path.is_file():
            continue
        report, name = read_report(path), safe_name("+".join(run_ids))
        if "tensors" in report:
            heading = f"Mask density by layer type and depth\n{', '.join(run_ids)}"
            products.append(drawn(f"fig6ab_density__{name}.png", heading, plot_density(report["tensors"], heading),
                                  run_ids))
        if "overlap" in report:
            heading = f"Mask overlap between experts\n{', '.join(run_ids)}"
            products.append(drawn(f"fig6d_overlap__{name}.png", heading, plot_overlap(report["overlap"], heading),
                                  run_ids))
    if not any(p.filename.startswith("fig6ab") for p in products):
        products.append(skipped("figure", "fig6ab_density__*.png", "Mask density by layer type and depth (Fig. 6a, b)",
                                "no run directory has a method_report.json with per-tensor densities"))
    if not any(p.filename.startswith("fig6d") for p in products):
        products.append(skipped("figure", "fig6d_overlap__*.png", "Mask overlap between experts (Fig. 6d)",
                                "no run directory has a method_report.json with a mask overlap matrix"))
    return products


def routing_figures(results):
    """Fig. 6c products: one per run whose rows carry routing weights on at least two test sources."""
    rows = results.rows
    products = []
    for run_id, mine in rows[rows["routing_weights"].notna()].groupby("run_id", sort=True):
        if mine["routing_weights"].map(len).nunique() != 1:
            products.append(skipped("figure", f"fig6c_routing__{safe_name(run_id)}.png", "Fig. 6c",
                                    f"the rows of {run_id} have routing weights of different lengths"))
            continue
        sources, weights = mean_routing_weights(mine, mine["benchmark"].iloc[0])
        if len(sources) < 2:
            continue
        heading = f"Sources clustered by routing weights\n{run_id}"
        products.append(drawn(f"fig6c_routing__{safe_name(run_id)}.png", heading,
                              plot_routing(sources, weights, heading), [run_id]))
    if not any(p.content for p in products):
        products.append(skipped("figure", "fig6c_routing__*.png", "Sources clustered by routing weights (Fig. 6c)",
                                "no run has routing_weights in its rows on two or more test sources"))
    return products


def render_figures(results):
    """Every figure `Product` (drawn or skipped with a note), in index order, in matplotlib's default style."""
    with style.context("default"):
        products = [*tradeoff_figures(results), *routing_figures(results), *report_figures(results)]
    return sorted(products, key=lambda p: p.filename)  # figure by figure: 3, 6ab, 6c, 6d
