"""Every command's bad command line is one line, ``prog: error: ...; see prog --help``, and exit status 2."""

import importlib

import pytest

COMMANDS = ["benchmark.run", "benchmark.leaderboard", "benchmark.records", "benchmark.cache", "benchmark.perf",
            "registry.mini", "registry.episodes", "registry.convert", "slurm.launch", "slurm.sweep"]


@pytest.mark.parametrize("module", COMMANDS)
def test_a_bad_command_line_is_one_line_naming_the_command_and_its_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--no-such-option"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"python -m {module}: error: ")
    assert err.endswith(f"; see python -m {module} --help\n")
