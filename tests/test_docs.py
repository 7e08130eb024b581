"""The README stays true: its two commands, its add-a-method example, and the paths it names."""

import re
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_has_the_setup_and_test_commands_that_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- ci:setup -->" in README and "<!-- ci:test -->" in README and "readme_command setup" in ci
    setup = README.split("<!-- ci:setup -->")[1].split("```bash\n")[1].split("\n")[0]
    assert setup.startswith("pip install ") and "python -m benchmark.run --gin methods/smat.gin" in setup
    assert README.split("<!-- ci:test -->")[1].split("```bash\n")[1].split("\n")[0] == "python -m pytest -q"


def test_every_repository_path_the_readme_names_exists():
    paths = set(re.findall(r"`((?:registry|benchmark|methods|tests|\.ci)/[\w./{},*-]+)`", README))
    for path in paths:
        for expanded in _expand(path):
            assert list(ROOT.glob(expanded)), f"README names {path}, which does not exist"


def _expand(path):
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [e for part in match.group(1).split(",") for e in _expand(path[: match.start()] + part + path[match.end():])]


def test_the_add_a_method_example_registers_trains_and_predicts(mini_root):
    code = README.split("# methods/last_block.py\n")[1].split("```")[0]
    module = types.ModuleType("methods.last_block")
    sys.modules["methods.last_block"] = module
    try:
        exec(compile(code, "README.md (methods/last_block.py)", "exec"), module.__dict__)
        from benchmark.episodes import BenchmarkData
        from methods import MINI_BACKBONE, Task, create_backbone, create_method, list_methods

        assert "last_block" in list_methods()
        method = create_method("last_block", backbone=create_backbone(MINI_BACKBONE, pretrained=False))
        method.configure_training(2)
        task = Task.from_episode(BenchmarkData("md_mini", mini_root).train_episodes(seed=0, num_episodes=1)[0])
        metrics = method.meta_train_step([task])
        assert metrics["loss"] > 0
        assert method.task_model(task.support_x, task.support_y, task.ways).predict(task.query_x).shape == task.query_y.shape
        assert any(p.requires_grad for p in method.backbone.blocks[-1].parameters())
        assert not any(p.requires_grad for p in method.backbone.blocks[0].parameters())
    finally:
        from methods import _registry

        _registry._METHODS.pop("last_block", None)
        sys.modules.pop("methods.last_block", None)
        torch.set_grad_enabled(True)
