"""``python -m benchmark.perf``: every sub-command runs and writes its figures; no figure is asserted here.

The runs use the mini backbone and tiny episodes on the CPU: what is checked is the shape of what a
user gets (the Table 5 rows with the paper's figures and the targets, the step ratio, the data rows)
and that a failing variant is reported, exits non-zero and keeps the figures already measured.
"""

import argparse
import json

import gin
import pytest
import torch

from benchmark import perf
from methods import MINI_BACKBONE, adapters

TINY = ["--backbone", MINI_BACKBONE, "--image-size", "32", "--ways", "3", "--repeats", "1", "--device", "cpu"]


@gin.configurable("perf_probe")
def probe_setting(value="default"):
    return value


def test_adapters_prints_table5_and_writes_every_variant(tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapters.json"
    with gin.unlock_config():
        gin.bind_parameter("full.steps", 2)
    try:
        perf.main(["adapters", *TINY, "--support", "6", "--query", "3", "--json", str(out)])
    finally:
        gin.clear_config()
    figures = json.loads(out.read_text())
    assert set(figures["adapters"]) == {"protonet", "gradient_free", "full", *perf.ADAPTER_VARIANTS}
    for label, f in figures["adapters"].items():
        assert f["seconds"] > 0 and "error" not in f, label
    assert figures["adapters"]["full_grad_checkpointing"]["paper_seconds"] == perf.PAPER_TABLE5["full"][0]
    assert figures["adapters"]["full_grad_checkpointing"]["bindings"] == {"full.grad_checkpointing": True}
    assert figures["adapters"]["full"]["target_memory_mib"] == perf.TARGETS["full"][1]
    assert figures["forward"]["images"] == 9 and figures["forward"]["images_per_second"] > 0
    assert figures["code_version"] and figures["torch"]  # what the figures were measured with
    table = capsys.readouterr().out
    assert "| full_grad_checkpointing " in table and "paper ÷ ours" in table


def test_a_variant_runs_with_its_bindings_and_the_default_without(monkeypatch):
    seen = {}

    def probe(method, task, lr, generator):
        seen.setdefault(probe_setting(), 0)
        seen[probe_setting()] += 1
        return task.query_y

    monkeypatch.setitem(adapters.ADAPTERS, "protonet", probe)
    monkeypatch.setattr(perf, "ADAPTER_VARIANTS", {"protonet_probed": ("protonet", {"perf_probe.value": "bound"})})
    perf.main(["adapters", *TINY, "--support", "6", "--query", "3", "--adapters", "protonet"])
    assert seen == {"default": 2, "bound": 2}  # a warm-up and one timed call each


def test_activations_reports_each_memory_setting_and_budgets_keep_less(tmp_path, capsys):
    out = tmp_path / "activations.json"
    perf.main(["activations", "--backbone", MINI_BACKBONE, "--image-size", "32", "--device", "cpu",
               "--images", "4", "--support", "6", "--json", str(out)])
    settings = json.loads(out.read_text())["settings"]
    assert set(settings) == set(perf.ACTIVATION_SETTINGS)
    kept = {label: f["mib_per_image"] for label, f in settings.items()}
    assert kept["compiled, budget 0.5"] < kept["compiled, budget 0.9"] < kept["compiled"]
    assert kept["compiled, grad checkpointing"] < kept["compiled, budget 0.5"]
    assert settings["eager"]["step_mib"] == pytest.approx(settings["eager"]["fixed_mib"] + 12 * kept["eager"])
    assert "| compiled, budget 0.5 " in capsys.readouterr().out


def test_step_reports_the_smat_to_pmf_ratio_and_profiles_each_step(tmp_path, capsys):
    out = tmp_path / "not_yet_made" / "step.json"  # --json makes its folder
    perf.main(["step", *TINY, "--support", "6", "--query", "3", "--tasks", "2", "--json", str(out),
               "--profile", str(tmp_path / "profiles")])
    figures = json.loads(out.read_text())
    assert set(figures["steps"]) == {"pmf", "smat", *perf.STEP_VARIANTS}
    assert figures["steps"]["smat_eager_inference"]["bindings"] == {"inference.compile_backbone": False}
    for label in figures["steps"]:
        assert "aten::" in (tmp_path / "profiles" / f"step_{label}.txt").read_text()  # the step's operators
    steps = figures["steps"]
    assert figures["ratio"] == pytest.approx(steps["smat"]["seconds"] / steps["pmf"]["seconds"])
    # each SMAT setting against PMF with the same setting where PMF has it, else against PMF's default
    compiled = {"smat_compiled_training", "smat_compiled_training_teacher_reuse"}
    assert figures["ratios"] == pytest.approx({
        label: steps[label]["seconds"] / steps["pmf_compiled_training" if label in compiled else "pmf"]["seconds"]
        for label in steps if label.startswith("smat")})
    assert set(figures["ratios"]) == {"smat", *(label for label in perf.STEP_VARIANTS if label.startswith("smat"))}
    assert "SMAT step / PMF step = " in (printed := capsys.readouterr().out)
    assert "(target <= 2.0: a GPU target) on cpu" in printed and ": met)" not in printed  # no verdict off a GPU


def test_a_failing_variant_exits_nonzero_and_keeps_the_other_figures(tmp_path, monkeypatch, capsys):

    def broken(method, task, lr, generator):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(adapters.ADAPTERS, "gradient_free", broken)
    out = tmp_path / "adapters.json"
    with pytest.raises(SystemExit) as exit_info:
        perf.main(["adapters", *TINY, "--support", "6", "--query", "3", "--adapters", "protonet", "gradient_free",
                   "--json", str(out)])
    assert "gradient_free" in str(exit_info.value.code)
    figures = json.loads(out.read_text())["adapters"]
    assert figures["protonet"]["seconds"] > 0
    assert figures["gradient_free"]["seconds"] is None
    assert "planted failure" in figures["gradient_free"]["error"]
    assert "gradient_free FAILED: RuntimeError: planted failure" in capsys.readouterr().out


def test_data_times_records_and_the_decoded_cache(tmp_path):
    """The clock starts at each loader's first episode: 3 episodes are 2 timed ones."""
    out = tmp_path / "data.json"
    perf.main(["data", "--inputs", "md", "--classes", "5", "--images-per-class", "12", "--image-px", "64", "48",
               "--workers", "0", "--episodes", "3", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["path"] for r in rows] == ["cache build (every source)", "records", "decoded cache"]
    for row in rows[1:]:
        assert row["episodes"] == 2 and row["images"] > 0 and row["episodes_per_s"] > 0


def test_data_hands_over_each_row_as_it_is_measured_and_refuses_one_episode(tmp_path, capsys):
    args = argparse.Namespace(inputs=["md"], classes=5, images_per_class=12, image_px=[64, 48], workers=[0], episodes=2)
    seen = []
    rows = perf.measure_data(args, tmp_path, measured=lambda rows: seen.append([r["path"] for r in rows]))
    assert seen == [["cache build (every source)"], ["cache build (every source)", "records"],
                    [r["path"] for r in rows]]
    with pytest.raises(SystemExit) as exit_info:
        perf.main(["data", "--inputs", "md", "--episodes", "1"])
    assert exit_info.value.code == 2 and "--episodes 1" in capsys.readouterr().err


def test_step_hands_over_its_ratio_with_each_row(monkeypatch):
    """A time limit that stops the step stage after the SMAT row still leaves SMAT ÷ PMF."""
    args = argparse.Namespace(backbone=MINI_BACKBONE, image_size=32, ways=3, support=6, query=3, tasks=2, repeats=1,
                              profile=None)
    monkeypatch.setattr(perf, "STEP_VARIANTS", {})
    seconds = iter([1.0, 2.0])  # PMF's step, then SMAT's
    monkeypatch.setattr(perf, "_timed", lambda fn, device, repeats: (next(seconds), None))
    handed = []

    def measured(step):
        handed.append(dict(step, steps=dict(step["steps"])))

    perf.measure_step(args, torch.device("cpu"), measured)
    assert [list(h["steps"]) for h in handed] == [["pmf"], ["pmf", "smat"]]
    assert handed[0]["ratio"] is None and handed[1]["ratio"] == 2.0 and handed[1]["ratios"] == {"smat": 2.0}


def test_all_measures_the_gpu_figures_first_and_writes_the_json_after_each_stage(tmp_path, monkeypatch):
    """`all` orchestrates the stages measured above (stand-ins here): the forward pass, the default adapters,
    the step, the adapters' variants, then the data pipeline; the JSON rewritten after each stage,
    ``--profile`` passed to the step."""
    out, stages = tmp_path / "perf.json", []
    figures = {
        "adapters": {"protonet": dict(seconds=0.1, peak_memory_mib=None, paper_seconds=0.2, paper_memory_mib=4332,
                                      target_seconds=0.02, target_memory_mib=None)},
        "step": {"steps": {"pmf": dict(seconds=1.0, peak_memory_mib=None), "smat": dict(seconds=2.0, peak_memory_mib=None)},
                 "ratio": 2.0, "ratios": {"smat": 2.0}},
        "data": [dict(input="md", path="records", workers=0, seconds=1.0, episodes_per_s=2.0, images_per_s=9.0)],
    }
    variant = dict(figures["adapters"]["protonet"], seconds=0.3)

    def stand_in(stage):
        def measure(args, device, measured=None, **which):  # the data stage's second argument is a folder
            written = json.loads(out.read_text()) if out.exists() else {}
            stages.append((stage + ("" if which.get("defaults", True) else " variants"), args,
                           sorted(set(written) & {"forward", *figures})))
            result = figures[stage] if which.get("defaults", True) else {"full_variant": variant}
            if measured is not None:
                measured(result)  # after its (last) row, as the real stages do
            return result
        return measure

    for stage in figures:
        monkeypatch.setattr(perf, f"measure_{stage}", stand_in(stage))
    perf.main(["all", "--backbone", MINI_BACKBONE, "--image-size", "32", "--repeats", "1", "--device", "cpu",
               "--profile", str(tmp_path / "profiles"), "--json", str(out)])
    assert [(stage, written) for stage, _, written in stages] == [
        ("adapters", ["forward"]), ("step", ["adapters", "forward"]), ("adapters variants", ["adapters", "forward", "step"]),
        ("data", ["adapters", "forward", "step"])]
    assert stages[1][1].profile == str(tmp_path / "profiles")
    written = json.loads(out.read_text())
    assert set(figures) <= set(written)
    assert set(written["adapters"]["figures"]) == {"protonet", "full_variant"}  # defaults and variants, one table


@pytest.mark.parametrize("stopped", ["step", "data"])
def test_all_keeps_the_rows_of_a_stage_stopped_midway(tmp_path, monkeypatch, stopped):
    """A time limit that stops the step stage, or the data stage, after its first row still leaves that row
    in the JSON."""
    out = tmp_path / "perf.json"
    protonet = dict(seconds=0.1, peak_memory_mib=None, paper_seconds=0.2, paper_memory_mib=4332, target_seconds=0.02,
                    target_memory_mib=None)
    monkeypatch.setattr(perf, "measure_forward", lambda args, device: dict(seconds=0.1, peak_memory_mib=None, images=600,
                                                                          images_per_second=6000.0))
    monkeypatch.setattr(perf, "measure_adapters",
                        lambda args, device, measured, **which: measured({"protonet": protonet}) or {"protonet": protonet})

    pmf = {"steps": {"pmf": dict(seconds=1.0, peak_memory_mib=None)}, "ratio": None, "ratios": {}}
    built = dict(input="md", path="cache build (every source)", workers=0, seconds=1.0)

    def stand_in(stage, first_row):
        def measure(args, device, measured):
            measured(first_row)
            if stage == stopped:
                raise KeyboardInterrupt  # as `timeout` stops the script
            return first_row
        return measure

    monkeypatch.setattr(perf, "measure_step", stand_in("step", pmf))
    monkeypatch.setattr(perf, "measure_data", stand_in("data", [built]))
    with pytest.raises(KeyboardInterrupt):
        perf.main(["all", "--backbone", MINI_BACKBONE, "--image-size", "32", "--device", "cpu", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["adapters"]["figures"] == {"protonet": protonet}
    assert written["step"]["steps"] == pmf["steps"]
    assert written.get("data") == ([built] if stopped == "data" else None)


def test_a_profiler_fault_costs_that_profile_only(tmp_path, monkeypatch):
    profile = perf._profile

    def failing_for_pmf(fn, device, path):
        if path.name == "step_pmf.txt":
            raise RuntimeError("planted profiler fault")
        return profile(fn, device, path)

    monkeypatch.setattr(perf, "_profile", failing_for_pmf)
    out = tmp_path / "step.json"
    perf.main(["step", *TINY, "--support", "6", "--query", "3", "--tasks", "2", "--json", str(out),
               "--profile", str(tmp_path / "profiles")])
    steps = json.loads(out.read_text())["steps"]
    assert set(steps) == {"pmf", "smat", *perf.STEP_VARIANTS} and all(f["seconds"] for f in steps.values())
    assert "planted profiler fault" in steps["pmf"]["profile_error"] and "profile_error" not in steps["smat"]
