"""``python -m benchmark.leaderboard`` (contract C4): synthetic run directories, statistics recomputed here.

Expected numbers are computed independently with the standard library (``statistics``), never with the
leaderboard's own helpers.
"""

import csv
import json
import math
import random
import statistics
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

from benchmark.leaderboard import main
from registry.catalog import get_benchmark

SHARED_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "shared" / "reference"
DATA = Path(__file__).resolve().parents[2] / "benchmark" / "data"
MINI = get_benchmark("md_mini")
PAPER = get_benchmark("md_paper")
MINI_BACKBONE = "smat_vit_mini_patch4_32"
DINO = "vit_small_patch16_224.dino"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- helpers -------------------------------------------------------------------------------------------


def make_row(**fields):
    """A result row with every contract-C3 key (and the optional ones); ``fields`` override."""
    row = dict(run_id="smat-default-md_mini-aaaa", method="smat", variant="default", adaptation="protonet",
               backbone=MINI_BACKBONE, benchmark="md_mini", source="mini_shapes", role="id", split="test", seed=0,
               episode=0, ways=5, support=10, query=50, accuracy=0.5, seconds=0.1, peak_memory_mib=None,
               config_hash="c" * 64, code_version="0123456789abcdef0123456789abcdef01234567", smoke=False,
               device="cpu", lr=None, lr_basis="no learning rate")
    row.update(fields)
    return row


def run_rows(bench=MINI, episodes=None, sources=None, accuracy=None, **fields):
    """Rows of every (source, episode) of ``bench``; ``accuracy(source_index, episode)`` defaults to random."""
    rng = random.Random(f"{fields.get('run_id')}/{fields.get('method')}/{fields.get('adaptation')}")
    accuracy = accuracy or (lambda i, e: round(rng.random(), 4))
    rows = []
    for i, source in enumerate(bench.test_sources):
        if sources is not None and source.name not in sources:
            continue
        for episode in range(bench.test_episodes if episodes is None else episodes):
            rows.append(make_row(benchmark=bench.name, source=source.name, role=source.role, episode=episode,
                                 accuracy=accuracy(i, episode), **fields))
    return rows


def write_run(directory, rows, config=None, report=None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "episodes.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    if config is not None:
        (directory / "config.gin").write_text(config)
    if report is not None:
        (directory / "method_report.json").write_text(json.dumps(report))
    return directory


def leaderboard(tmp_path, *run_dirs, out="results", merge=False):
    out = tmp_path / out
    main([*map(str, run_dirs), "--out", str(out), *(["--merge-runs"] if merge else [])])
    return out


def table(text):
    """{row name: {column header: cell}} of the first markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}


def numbers(cell):
    """(mean, ci) of a ``mean ± ci[*†]`` cell."""
    mean, ci = cell.rstrip("*†").split(" ± ")
    return float(mean), float(ci)


def expected(values):
    """(mean, CI) in percent: CI = 1.96 · population std / √n."""
    return 100 * statistics.fmean(values), 100 * 1.96 * statistics.pstdev(values) / math.sqrt(len(values))


def accuracies(rows, source):
    return [r["accuracy"] for r in rows if r["source"] == source]


MINI_TABLE = f"md_mini__{MINI_BACKBONE}.md"


# --- cells and averages ---------------------------------------------------------------------------------


def test_cell_is_mean_and_95_ci_in_percent_over_episodes(tmp_path):
    rows = run_rows(run_id="smat-default-md_mini-aaaa")
    out = leaderboard(tmp_path, write_run(tmp_path / "run", rows))
    cells = table((out / MINI_TABLE).read_text())
    for source in MINI.test_sources:
        assert numbers(cells[source.name]["SMAT"]) == pytest.approx(expected(accuracies(rows, source.name)), abs=0.006)


def test_averages_are_means_of_per_source_means(tmp_path):
    # unequal episode counts: the pooled mean over episodes would differ from the mean of source means
    rows = [r for r in run_rows() if r["source"] != "mini_shapes" or r["episode"] < 4]
    out = leaderboard(tmp_path, write_run(tmp_path / "run", rows))
    cells = table((out / MINI_TABLE).read_text())
    for row_name, role in (("ID Avg", "id"), ("OOD Avg", "ood")):
        per_source = [expected(accuracies(rows, s.name)) for s in MINI.test_sources if s.role == role]
        mean = statistics.fmean(m for m, _ in per_source)
        ci = math.sqrt(sum(c**2 for _, c in per_source)) / len(per_source)
        assert numbers(cells[row_name]["SMAT"]) == pytest.approx((mean, ci), abs=0.006)
    pooled = 100 * statistics.fmean(r["accuracy"] for r in rows if r["role"] == "id")
    assert abs(numbers(cells["ID Avg"]["SMAT"])[0] - pooled) > 0.01


def test_repeated_rows_are_counted_once(tmp_path):
    rows = run_rows()
    single = leaderboard(tmp_path, write_run(tmp_path / "once" / "run", rows), out="single")
    write_run(tmp_path / "twice" / "run", rows + rows[:30])
    write_run(tmp_path / "twice" / "copy" / "run", rows[10:50])
    repeated = leaderboard(tmp_path, tmp_path / "twice", out="repeated")
    assert (repeated / MINI_TABLE).read_bytes() == (single / MINI_TABLE).read_bytes()
    assert "70 repeated rows counted once" in (repeated / "README.md").read_text()


def test_runs_of_one_configuration_are_separate_columns_unless_merged(tmp_path):
    first = run_rows(run_id="smat-default-md_mini-aaaa")
    second = run_rows(run_id="smat-default-md_mini-bbbb", accuracy=lambda i, e: (e % 4) / 4)
    other = run_rows(run_id="smat-default-md_mini-cccc")  # another τ: a sweep point, never merged with the seeds
    config = "run.method = 'smat'\nrun.seed = {}\nsmat.target_sparsity = {}\n"
    dirs = (write_run(tmp_path / "a", first, config.format(0, 0.9)), write_run(tmp_path / "b", second, config.format(1, 0.9)),
            write_run(tmp_path / "c", other, config.format(0, 0.5)))
    apart = table((leaderboard(tmp_path, *dirs, out="apart") / MINI_TABLE).read_text())  # labelled by what differs
    assert set(apart["mini_shapes"]) == {"SMAT [seed=0, target_sparsity=0.5]", "SMAT [seed=0, target_sparsity=0.9]",
                                         "SMAT [seed=1, target_sparsity=0.9]"}
    assert numbers(apart["mini_glyphs"]["SMAT [seed=1, target_sparsity=0.9]"]) == pytest.approx(
        expected(accuracies(second, "mini_glyphs")), abs=0.006)
    merged = table((leaderboard(tmp_path, *dirs, out="merged", merge=True) / MINI_TABLE).read_text())
    per_episode = [(a + b) / 2 for a, b in zip(accuracies(first, "mini_glyphs"), accuracies(second, "mini_glyphs"))]
    assert set(merged["mini_glyphs"]) == {"SMAT [target_sparsity=0.9]", "SMAT [target_sparsity=0.5]"}  # seeds merged
    assert numbers(merged["mini_glyphs"]["SMAT [target_sparsity=0.9]"]) == pytest.approx(expected(per_episode), abs=0.006)
    unknown = (write_run(tmp_path / "d", first), write_run(tmp_path / "e", second))  # no config.gin: never merged
    merged = table((leaderboard(tmp_path, *unknown, out="unknown", merge=True) / MINI_TABLE).read_text())
    assert set(merged["mini_glyphs"]) == {"SMAT [aaaa]", "SMAT [bbbb]"}


def test_the_points_of_a_sweep_are_columns_named_by_their_values_in_numeric_order(tmp_path):
    config = "run.method = 'smat'\nsmat.num_experts = {}\n"
    dirs = [write_run(tmp_path / str(m), run_rows(run_id=f"smat-default-md_mini-{h}"), config.format(m))
            for m, h in ((16, "aaaa"), (2, "bbbb"), (8, "cccc"))]
    header = next(line for line in (leaderboard(tmp_path, *dirs) / MINI_TABLE).read_text().splitlines()
                  if line.startswith("| Source"))
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == [
        "SMAT [num_experts=2]", "SMAT [num_experts=8]", "SMAT [num_experts=16]"]


def test_cells_with_fewer_episodes_than_declared_are_marked(tmp_path):
    rows = [r for r in run_rows() if r["source"] != "mini_digits" or r["episode"] < MINI.test_episodes - 1]
    text = (leaderboard(tmp_path, write_run(tmp_path / "run", rows)) / MINI_TABLE).read_text()
    cells = table(text)
    assert cells["mini_digits"]["SMAT"].endswith("*") and cells["OOD Avg"]["SMAT"].endswith("*")
    assert not cells["mini_sketch"]["SMAT"].endswith("*") and not cells["ID Avg"]["SMAT"].endswith("*")
    assert f"fewer than {MINI.test_episodes} episodes" in text


def test_smoke_rows_are_ignored(tmp_path):
    rows = run_rows(accuracy=lambda i, e: 0.5)
    smoke = [dict(r, accuracy=1.0, smoke=True) for r in run_rows(episodes=25)]  # same keys, and extra episodes
    smoke_only = run_rows(run_id="pmf-default-md_mini-ssss", method="pmf", smoke=True, episodes=2)
    out = leaderboard(tmp_path, write_run(tmp_path / "run", rows + smoke), write_run(tmp_path / "smoke", smoke_only))
    cells = table((out / MINI_TABLE).read_text())
    assert cells["mini_shapes"] == {"SMAT": "50.00 ± 0.00"}
    assert f"{len(smoke) + len(smoke_only)} smoke rows ignored" in (out / "README.md").read_text()


def test_a_new_method_gets_its_own_table(tmp_path):
    smat = run_rows(bench=PAPER, episodes=3, backbone=DINO, run_id="smat-default-md_paper-aaaa")
    new = run_rows(bench=PAPER, episodes=3, backbone=DINO, run_id="mymethod-default-md_paper-bbbb", method="mymethod")
    out = leaderboard(tmp_path, write_run(tmp_path / "smat", smat), write_run(tmp_path / "new", new))
    assert "mymethod" not in (out / "table1.md").read_text()
    own = table((out / f"md_paper__{DINO}.md").read_text())
    assert list(own["ilsvrc_2012"]) == ["mymethod"]
    assert numbers(own["ilsvrc_2012"]["mymethod"]) == pytest.approx(expected(accuracies(new, "ilsvrc_2012")),
                                                                     abs=0.006)
    assert f"md_paper__{DINO}.md" in (out / "README.md").read_text()


# --- the paper's tables ----------------------------------------------------------------------------------


def reference_rows(name):
    path = SHARED_REFERENCE / f"published_{name}.csv"
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


PAPER_NAMES = {"ImageNet": "ilsvrc_2012", "Omniglot": "omniglot", "Aircraft": "aircraft", "CUB": "cu_birds",
               "DTD": "dtd", "Quickdraw": "quickdraw", "Fungi": "fungi", "VGGFlower": "vgg_flower",
               "TrafficSig": "traffic_sign", "MSCOCO": "mscoco", "Cifar10": "cifar10", "Cifar100": "cifar100",
               "MNIST": "mnist", "Sketch": "sketch", "Pet": "pet", "Clipart": "clipart", "Food": "food", "Cars": "cars",
               "ID Avg": "ID Avg", "OOD Avg": "OOD Avg"}


@pytest.mark.parametrize("name", ["accuracy", "ablation", "cost"])
def test_published_data_is_a_verbatim_copy_of_the_reference(name):
    assert (DATA / f"published_{name}.csv").read_bytes() == (SHARED_REFERENCE / f"published_{name}.csv").read_bytes()


def test_published_numbers_sit_in_their_own_column_and_match_the_csv(tmp_path):
    smat = run_rows(bench=PAPER, episodes=4, backbone=DINO, run_id="smat-default-md_paper-aaaa")
    full = run_rows(bench=PAPER, episodes=4, backbone=DINO, run_id="smat-default-md_paper-aaaa", adaptation="full")
    out = leaderboard(tmp_path, write_run(tmp_path / "run", smat + full))
    cells = table((out / "table1.md").read_text())
    published = {(PAPER_NAMES[r["dataset"]], r["method"]): float(r["accuracy"])
                 for r in reference_rows("accuracy") if r["table"] == "table1"}
    for label in ("SMAT", "SMAT+full"):
        for row_name, columns in cells.items():
            assert float(columns[f"{label} (paper)"]) == published[(row_name, label)]
            assert " ± " in columns[label]  # ours stays ours
    headers = list(cells["ilsvrc_2012"])
    assert headers.index("SMAT (paper)") == headers.index("SMAT") + 1
    assert "PMF+LoRA" in (out / "table1.md").read_text()  # published but not measured: named in a note
    ablation = table((out / "table2.md").read_text())["SMAT"]
    first = reference_rows("ablation")[0]
    assert (ablation["ID Avg (paper)"], ablation["OOD Avg (paper)"], ablation["Avg (paper)"]) == (
        first["id_avg"], first["ood_avg"], first["avg"])


def test_table3s_ood_average_stands_beside_ours_over_its_five_sources(tmp_path):
    """Table 3 lists 5 of the 10 OOD sets: the paper's "Avg OOD" is not an average over our ten."""
    five = ("traffic_sign", "mscoco", "cifar10", "cifar100", "mnist")
    rows = run_rows(bench=PAPER, episodes=3, backbone="vit_small_patch16_224.augreg_in21k", run_id="smat-x")
    cells = table((leaderboard(tmp_path, write_run(tmp_path / "run", rows)) / "table3.md").read_text())
    published = {r["dataset"]: r["accuracy"] for r in reference_rows("accuracy")
                 if r["table"] == "table3" and r["method"] == "SMAT"}
    assert cells["OOD Avg"]["SMAT (paper)"] == "—"
    assert cells["OOD Avg, the paper's 5 sources"]["SMAT (paper)"] == published["Avg OOD"]
    ours = statistics.fmean(statistics.fmean(accuracies(rows, s)) for s in five)
    assert numbers(cells["OOD Avg, the paper's 5 sources"]["SMAT"])[0] == pytest.approx(100 * ours, abs=0.006)
    assert cells["ID Avg"]["SMAT (paper)"] == published["Avg ID"]
    assert "ID Avg, the paper's" not in " ".join(cells)  # it lists all eight ID sources


def test_table2_marks_the_component_switches_of_each_variant(tmp_path):
    dirs = []
    for variant in ("default", "no_dense_teacher", "no_meta_split", "mlp_experts"):
        rows = run_rows(bench=PAPER, episodes=2, backbone=DINO, variant=variant, run_id=f"smat-{variant}-x")
        dirs.append(write_run(tmp_path / variant, rows))
    dirs.append(write_run(tmp_path / "pmf", run_rows(bench=PAPER, episodes=2, backbone=DINO, method="pmf",
                                                     run_id="pmf-default-x")))
    rows = table((leaderboard(tmp_path, *dirs) / "table2.md").read_text())
    switches = {name: tuple(cells[k] for k in ("MLS", "Meta", "DT", "IE")) for name, cells in rows.items()}
    assert switches == {"SMAT": ("✓", "✓", "✓", "✓"), "SMAT (no_dense_teacher)": ("✓", "✓", "✗", "✓"),
                        "SMAT (no_meta_split)": ("✓", "✗", "✓", "✓"), "SMAT (mlp_experts)": ("✗", "✓", "✓", "✗"),
                        "PMF": ("✗", "✗", "✗", "✗")}
    assert list(rows) == ["SMAT", "SMAT (no_dense_teacher)", "SMAT (no_meta_split)", "SMAT (mlp_experts)", "PMF"]


def test_every_series_id_and_ood_averages_appear_in_some_table(tmp_path):
    """SMAT with each of the five adapters (two runs of gradient_free): every (run, adapter) column has its
    ID Avg and OOD Avg somewhere, even those Tables 1 and 3 do not hold (gradient_free, full_joint)."""
    series = {}  # column label → its rows
    for run, adapters in (("aaaa", ("protonet", "full", "lora", "gradient_free", "full_joint")),
                          ("bbbb", ("gradient_free",))):
        for adaptation in adapters:
            series[(run, adaptation)] = run_rows(bench=PAPER, episodes=2, backbone=DINO, adaptation=adaptation,
                                                 run_id=f"smat-default-md_paper-{run}")
    dirs = [write_run(tmp_path / run, [r for (k, _), rows in series.items() if k == run for r in rows])
            for run in ("aaaa", "bbbb")]
    out = leaderboard(tmp_path, *dirs)
    tables = [table(path.read_text()) for path in sorted(out.glob("*.md")) if "| ID Avg" in path.read_text()]
    suffix = {"protonet": "", "full": "+full", "lora": "+LoRA", "gradient_free": "+gradient-free",
              "full_joint": "+full-joint"}
    for (run, adaptation), rows in series.items():
        label = f"SMAT{suffix[adaptation]}" + (f" [{run}]" if adaptation == "gradient_free" else "")
        found = [(cells["ID Avg"][label], cells["OOD Avg"][label]) for cells in tables
                 if "ID Avg" in cells and label in cells["ID Avg"]]
        assert found, f"{label}: no table shows its ID Avg and OOD Avg"
        for role, cell in zip(("id", "ood"), found[0]):
            means = [statistics.fmean(accuracies(rows, s.name)) for s in PAPER.test_sources if s.role == role]
            assert numbers(cell)[0] == pytest.approx(100 * statistics.fmean(means), abs=0.006), (label, role)
    assert "full-joint" not in (out / "table1.md").read_text()  # the paper's tables keep the paper's columns


def test_table4_rows_are_the_sources_with_gradient_free_and_table5_reports_cost(tmp_path):
    base = dict(bench=PAPER, episodes=3, backbone=DINO, run_id="smat-default-md_paper-aaaa")
    protonet = run_rows(**base, seconds=0.5, peak_memory_mib=100.0, device="NVIDIA H100 80GB HBM3")
    free = run_rows(**base, adaptation="gradient_free", sources={"mnist", "cifar10"}, seconds=2.0,
                    peak_memory_mib=300.0, device="NVIDIA H100 80GB HBM3")
    out = leaderboard(tmp_path, write_run(tmp_path / "run", protonet + free))
    strategies = table((out / "table4.md").read_text())
    assert list(strategies) == ["cifar10", "mnist", "Avg, these 2 sources"]  # not the paper's five: no "Avg"
    assert strategies["mnist"]["SMAT+gradient-free (paper)"] == "94.63"
    assert strategies["Avg, these 2 sources"]["SMAT+gradient-free (paper)"] == "—"
    cost = table((out / "table5.md").read_text())
    assert cost["SMAT"]["Time (s/task)"] == "0.50" and cost["SMAT"]["Peak GPU memory (MiB)"] == "100"
    assert cost["SMAT+gradient-free"]["Time (s/task)"] == "2.00" and cost["SMAT+gradient-free"]["Episodes"] == "6"
    assert cost["SMAT+gradient-free"]["Device"] == "NVIDIA H100 80GB HBM3"
    per_source = [statistics.fmean(r["accuracy"] for r in free if r["source"] == s) for s in ("cifar10", "mnist")]
    assert numbers(cost["SMAT+gradient-free"]["Avg accuracy"])[0] == pytest.approx(
        100 * statistics.fmean(per_source), abs=0.006)
    assert cost["SMAT+gradient-free"]["Avg accuracy (paper)"] == "—"  # the paper's is over its five sources


def test_table4_and_table5_averages_beside_the_papers_are_over_its_five_sources(tmp_path):
    """With every source run, "Avg" (and Table 5's accuracy) cover the paper's Table 4 sources only."""
    five = {"traffic_sign", "mscoco", "cifar10", "cifar100", "mnist"}
    base = dict(bench=PAPER, episodes=3, backbone=DINO, run_id="smat-default-md_paper-aaaa")
    rows = run_rows(**base) + run_rows(**base, adaptation="gradient_free")
    out = leaderboard(tmp_path, write_run(tmp_path / "run", rows))
    strategies = table((out / "table4.md").read_text())
    assert "Avg" in strategies and f"Avg, these {len(strategies) - 2} sources" in strategies
    assert strategies["Avg"]["SMAT+gradient-free (paper)"] == "75.43"
    chosen = [r for r in rows if r["adaptation"] == "gradient_free"]
    paper_avg = statistics.fmean(statistics.fmean(r["accuracy"] for r in chosen if r["source"] == s) for s in five)
    assert numbers(strategies["Avg"]["SMAT+gradient-free"])[0] == pytest.approx(100 * paper_avg, abs=0.006)
    cost = table((out / "table5.md").read_text())
    assert numbers(cost["SMAT+gradient-free"]["Avg accuracy"])[0] == pytest.approx(100 * paper_avg, abs=0.006)
    assert cost["SMAT+gradient-free"]["Avg accuracy (paper)"] == "75.43"


# --- paired comparisons ----------------------------------------------------------------------------------


def paired_table(text, heading):
    return table(text.split(f"### {heading}\n", 1)[1])


def test_paired_differences_their_ci_and_n_use_only_common_episodes(tmp_path):
    smat = run_rows(run_id="smat-default-md_mini-aaaa")
    pmf = [r for r in run_rows(run_id="pmf-default-md_mini-bbbb", method="pmf") if r["episode"] % 3]
    out = leaderboard(tmp_path, write_run(tmp_path / "smat", smat), write_run(tmp_path / "pmf", pmf))
    cells = paired_table((out / "paired.md").read_text(), "SMAT − PMF")
    baseline = {(r["source"], r["episode"]): r["accuracy"] for r in pmf}
    for source in MINI.test_sources:
        diffs = [r["accuracy"] - baseline[(r["source"], r["episode"])] for r in smat
                 if r["source"] == source.name and (r["source"], r["episode"]) in baseline]
        row = cells[source.name]
        assert row["n"] == str(len(diffs)) and row["Δ (points) ± 95% CI"].endswith("*")
        assert numbers(row["Δ (points) ± 95% CI"]) == pytest.approx(expected(diffs), abs=0.006)
        assert float(row["Wilcoxon p"]) == pytest.approx(wilcoxon(diffs).pvalue, rel=1e-2)


def test_paired_all_zero_differences_give_p_of_one(tmp_path):
    same = run_rows(run_id="smat-default-md_mini-aaaa", accuracy=lambda i, e: 0.75)
    twin = run_rows(run_id="pre-default-md_mini-bbbb", method="pre", accuracy=lambda i, e: 0.75)
    out = leaderboard(tmp_path, write_run(tmp_path / "smat", same), write_run(tmp_path / "pre", twin))
    cells = paired_table((out / "paired.md").read_text(), "SMAT − Pre")
    assert cells["mini_shapes"]["Δ (points) ± 95% CI"] == "+0.00 ± 0.00" and cells["Avg"]["Wilcoxon p"] == "1"


# --- figures, determinism, the index ---------------------------------------------------------------------


def smat_report(experts=4):
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"] + [
        f"blocks.{i}.{part}" for i in range(2) for part in
        ("norm1.weight", "attn.qkv.weight", "attn.proj.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight")]
    tensors = {name: {"numel": 10 + k, "density": [((k + m) % 5) / 5 for m in range(experts)]}
               for k, name in enumerate(names)}
    overlap = [[1.0 if i == j else 0.1 * (i + j) / experts for j in range(experts)] for i in range(experts)]
    return {"variant": "default", "target_sparsity": 0.9, "tensors": tensors, "overlap": overlap,
            "expected_sparsity": [0.9] * experts, "l0_sparsity": [0.9] * experts, "lagrange_multipliers": [0] * experts}


def figure_runs(tmp_path):
    """Two SMAT runs (τ, M in config.gin, a method report, routing weights) and a PMF run."""
    dirs = []
    for k, (tau, experts) in enumerate(((0.9, 4), (0.5, 8))):
        run_id = f"smat-default-md_mini-{'ab'[k] * 4}"
        sources = [s.name for s in MINI.test_sources]
        rows = [dict(r, routing_weights=[(r["episode"] + sources.index(r["source"]) * (i + 1) + k) % 7 / 7
                                         for i in range(experts)]) for r in run_rows(run_id=run_id)]
        config = f"run.method = 'smat'\nsmat.num_experts = {experts}\nsmat.target_sparsity = {tau}\n"
        dirs.append(write_run(tmp_path / "runs" / f"smat{k}", rows, config, smat_report(experts)))
    dirs.append(write_run(tmp_path / "runs" / "pmf", run_rows(run_id="pmf-default-md_mini-cccc", method="pmf")))
    return dirs


def test_regeneration_is_byte_identical(tmp_path):
    dirs = figure_runs(tmp_path)
    first = leaderboard(tmp_path, *dirs, out="first")
    second = leaderboard(tmp_path, *reversed(dirs), out="second")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and any(n.endswith(".png") for n in names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_regeneration_removes_what_it_no_longer_writes_and_nothing_else(tmp_path):
    dirs = figure_runs(tmp_path)
    first = {p.name for p in leaderboard(tmp_path, *dirs, out="out").iterdir()}
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    out = leaderboard(tmp_path, dirs[-1], out="out")  # the PMF run only
    second = {p.name for p in out.iterdir()}
    assert second < first | {"notes.txt"} and "notes.txt" in second
    assert second - {"notes.txt", ".generated"} == set((out / ".generated").read_text().split())
    assert any(name.endswith(".png") for name in first - second)  # SMAT's figures are gone


@pytest.mark.parametrize("entry", ["../victim.md", "{victim}", "sub/../../victim.md", ".hidden.md", "notes.txt"],
                         ids=["parent", "absolute", "nested", "hidden", "not_a_product"])
def test_only_files_the_leaderboard_wrote_into_out_are_ever_removed(tmp_path, capsys, entry):
    """A ``.generated`` line naming anything but a plain ``*.md``/``*.png`` name of ``--out`` is refused with
    ``.generated:line``, exit 2, before anything is written or removed."""
    run = write_run(tmp_path / "run", run_rows(episodes=2))
    out = leaderboard(tmp_path, run)
    for path in (tmp_path / "victim.md", out / "sub" / "victim.md", out / ".hidden.md", out / "notes.txt"):
        path.parent.mkdir(exist_ok=True)
        path.write_text("the user's own file")
    with open(out / ".generated", "a") as f:
        f.write(entry.format(victim=tmp_path / "victim.md") + "\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and run not in p.parents}
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    lines = (out / ".generated").read_text().splitlines()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f".generated:{len(lines)}:" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and run not in p.parents} == before


def test_figures_are_drawn_when_runs_hold_their_inputs(tmp_path, capsys):
    out = leaderboard(tmp_path, *figure_runs(tmp_path))
    printed = capsys.readouterr().out.split()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == sorted([f"fig3_tradeoff__md_mini__{MINI_BACKBONE}.png"] + [
        f"fig6{kind}__smat-default-md_mini-{c * 4}.png" for kind in ("ab_density", "c_routing", "d_overlap")
        for c in "ab"])
    assert all((out / f).read_bytes().startswith(PNG_SIGNATURE) for f in figures)
    readme = (out / "README.md").read_text()
    assert all(f"[{f}]({f})" in readme for f in figures) and "fig3" not in readme.split("## Skipped")[-1]
    assert sorted(Path(p).name for p in printed) == sorted(p.name for p in out.iterdir())


def test_fig3_points_are_default_smat_runs_over_every_source(tmp_path, monkeypatch):
    """A Table 2 ablation is no point of the τ/M trade-off; a run that lacks a source's rows, or some episodes of
    one, is named, not drawn."""
    from benchmark import figures

    drawn = []
    plot = figures.plot_tradeoff
    monkeypatch.setattr(figures, "plot_tradeoff", lambda points, heading: drawn.append(points) or plot(points, heading))
    config = "run.method = 'smat'\nsmat.num_experts = 8\nsmat.target_sparsity = 0.7\n"
    ablation = run_rows(run_id="smat-no_dense_teacher-md_mini-dddd", variant="no_dense_teacher")
    partial = run_rows(run_id="smat-default-md_mini-eeee", sources={s.name for s in MINI.test_sources[1:]})
    evaluating = run_rows(run_id="smat-default-md_mini-ffff", episodes=MINI.test_episodes - 1)
    out = leaderboard(tmp_path, *figure_runs(tmp_path), write_run(tmp_path / "runs" / "ablation", ablation, config),
                      write_run(tmp_path / "runs" / "partial", partial, config),
                      write_run(tmp_path / "runs" / "evaluating", evaluating, config))
    assert [sorted((tau, m) for *_, tau, m in points) for points in drawn] == [[(0.5, 8), (0.9, 4)]]
    (note,) = [line for line in (out / "README.md").read_text().splitlines() if "fig3_tradeoff__*.png" in line]
    assert "smat-default-md_mini-eeee" in note and "smat-default-md_mini-ffff" in note and "dddd" not in note


def test_figures_are_skipped_with_a_note_when_runs_lack_their_inputs(tmp_path):
    out = leaderboard(tmp_path, write_run(tmp_path / "run", run_rows()))
    assert not list(out.glob("*.png"))
    skipped = (out / "README.md").read_text().split("## Skipped", 1)[1]
    for name in ("fig3_tradeoff", "fig6ab_density", "fig6c_routing", "fig6d_overlap", "table1.md", "paired.md"):
        assert f"- {name}" in skipped
    assert "smat-default-md_mini-aaaa left out" in skipped  # no config.gin: no τ, M


def test_index_names_the_runs_config_hashes_and_code_versions_of_each_file(tmp_path):
    out = leaderboard(tmp_path, write_run(tmp_path / "run", run_rows(config_hash="f" * 64, code_version="v1.2")))
    readme = (out / "README.md").read_text()
    entry = readme.split(f"[{MINI_TABLE}]({MINI_TABLE})", 1)[1].split("\n- ", 1)[0]
    assert "`smat-default-md_mini-aaaa`" in entry and "f" * 12 in entry and "v1.2" in entry


# --- errors ----------------------------------------------------------------------------------------------


def test_missing_directory_exits_2_with_one_line_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err


BAD_ROWS = {  # id → (a row appended to a good run's 12 rows, what its error line says)
    "missing_keys": ({"run_id": "x", "accuracy": 0.5}, "lacks"),
    "null_seed": (make_row(seed=None), "seed = None"),
    "text_accuracy": (make_row(accuracy="0.5"), "accuracy = '0.5'"),
    "nan_accuracy": (make_row(episode=5, accuracy=math.nan), "accuracy = nan"),
    "inf_accuracy": (make_row(episode=5, accuracy=math.inf), "accuracy = inf"),
    "accuracy_above_1": (make_row(episode=5, accuracy=1.7), "accuracy = 1.7"),
    "negative_accuracy": (make_row(episode=5, accuracy=-0.5), "accuracy = -0.5"),
    "negative_seconds": (make_row(episode=5, seconds=-0.1), "seconds = -0.1"),
    "nan_seconds": (make_row(episode=5, seconds=math.nan), "seconds = nan"),
    "negative_memory": (make_row(episode=5, peak_memory_mib=-1), "peak_memory_mib = -1"),
    "valid_split": (make_row(split="valid"), "split 'valid'"),
    "other_seed": (make_row(episode=5, seed=3), "seed 3"),
    "episode_past_the_end": (make_row(episode=MINI.test_episodes), f"episode {MINI.test_episodes} is outside 0-19"),
    "negative_episode": (make_row(episode=-1), "episode -1 is outside"),
    "other_source": (make_row(source="mini_pretrain"), "'mini_pretrain' is not a test source"),
    "unknown_benchmark": (make_row(benchmark="md_nope"), "md_nope"),
}


@pytest.mark.parametrize("bad, says", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_exits_2_naming_the_file_and_line_before_anything_is_written(tmp_path, capsys, bad, says):
    run = write_run(tmp_path / "run", run_rows(episodes=2))
    out = leaderboard(tmp_path, run)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with open(run / "episodes.jsonl", "a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and f"episodes.jsonl:{6 * 2 + 1}: " in err
    assert says in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_episode_range_is_the_runs_test_episodes(tmp_path, capsys):
    """A run bound to ``run.test_episodes = N`` (its config.gin) has episodes 0 .. N − 1, even beyond the
    benchmark's count."""
    more = MINI.test_episodes + 5
    longer = write_run(tmp_path / "longer", run_rows(episodes=more), config=f"run.test_episodes = {more}\n")
    cells = table((leaderboard(tmp_path, longer) / MINI_TABLE).read_text())
    assert numbers(cells["mini_shapes"]["SMAT"]) == pytest.approx(
        expected(accuracies(run_rows(episodes=more), "mini_shapes")), abs=0.006)
    default = write_run(tmp_path / "default", run_rows(episodes=more), config="run.test_episodes = None\n")
    with pytest.raises(SystemExit):
        main([str(default), "--out", str(tmp_path / "refused")])
    assert f"episode {MINI.test_episodes} is outside 0-{MINI.test_episodes - 1}" in capsys.readouterr().err


def test_repeats_of_an_episode_with_other_accuracies_are_refused_naming_both_places(tmp_path, capsys):
    """Identical repeats are counted once (above); a repeat that disagrees is an error naming both rows."""
    rows = run_rows(episodes=2)
    first = write_run(tmp_path / "a" / "run", rows)
    copy = write_run(tmp_path / "b" / "run", [dict(r, accuracy=0.125) if i == 7 else r for i, r in enumerate(rows)])
    for runs in ([first, copy], [copy, first]):  # either order: the first no longer wins silently
        with pytest.raises(SystemExit) as exit_info:
            main([*map(str, runs), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1
        assert f"{first / 'episodes.jsonl'}:8 and {copy / 'episodes.jsonl'}:8:" in err and "0.125" in err
    assert not (tmp_path / "out").exists()
    within = write_run(tmp_path / "c" / "run", rows + [dict(rows[0], accuracy=0.125)])
    with pytest.raises(SystemExit):
        main([str(within), "--out", str(tmp_path / "out")])
    assert f"episodes.jsonl:1 and {within / 'episodes.jsonl'}:13:" in capsys.readouterr().err


def test_runs_that_saw_other_images_in_one_episode_are_refused_before_anything_is_written(tmp_path, capsys):
    """Rows of one episode identity with two ``episode_digest`` values (e.g. records converted twice) are not
    comparable: one line naming the episode, both digests and their runs, exit 2, ``--out`` untouched.
    Rows without a digest (written before it existed) are not checked."""
    digest = lambda source, episode: f"{source}-{episode}"  # noqa: E731
    same = [dict(r, episode_digest=digest(r["source"], r["episode"])) for r in run_rows(episodes=2)]
    other = [dict(r, run_id="pmf-default-md_mini-bbbb", method="pmf") for r in same]
    other[3]["episode_digest"] = "reconverted"
    older = [dict(r, run_id="pre-default-md_mini-cccc", method="pre") for r in run_rows(episodes=2)]
    runs = [write_run(tmp_path / name, rows) for name, rows in (("smat", same), ("pmf", other), ("pre", older))]
    out = leaderboard(tmp_path, runs[0], runs[2], out="kept")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, runs), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    clash = other[3]
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"episode md_mini/{clash['source']}/test/0/{clash['episode']} has other images in other rows" in err
    assert "reconverted in pmf-default-md_mini-bbbb" in err and "in smat-default-md_mini-aaaa" in err
    assert "more episodes" not in err  # the only one
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    copy = write_run(tmp_path / "copy", [dict(r, episode_digest="elsewhere") if i == 0 else r for i, r in enumerate(same)])
    with pytest.raises(SystemExit) as exit_info:  # a copy of one run that saw other images is not a repeat
        main([str(runs[0]), str(copy), "--out", str(out)])
    assert exit_info.value.code == 2 and "elsewhere in smat-default-md_mini-aaaa" in capsys.readouterr().err


def test_the_index_quotes_the_script_that_made_the_runs(tmp_path, capsys):
    run = write_run(tmp_path / "run", run_rows(episodes=2, run_id="smat-default-md_mini-aaaa"))
    script = tmp_path / "regenerate.sh"
    script.write_text("python -m benchmark.run --gin methods/smat.gin --out runs/smat\n")
    out = tmp_path / "results"
    main([str(run), "--out", str(out), "--commands", str(script)])
    readme = (out / "README.md").read_text()
    assert "## How these runs were made\n\n```bash\npython -m benchmark.run --gin methods/smat.gin --out runs/smat\n```" \
        in readme
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--out", str(tmp_path / "other"), "--commands", str(tmp_path / "missing.sh")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "--commands" in err and "missing.sh" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "other").exists()
