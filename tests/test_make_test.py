"""`make test PYTEST_ARGS=...` runs what the arguments select, not the whole suite
(README, Development): a file, `-k`, `-x`; with no path, pytest.ini's `tests`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_make_passes_the_arguments_alone():
    out = subprocess.run(["make", "-n", "test", "PYTEST_ARGS=tests/snapkv -x -k tracker"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    command = next(line for line in out.splitlines() if "-m pytest" in line)
    assert command.split("-m pytest", 1)[1].split(";")[0].split() == ["-ra", "tests/snapkv", "-x", "-k", "tracker"]


def test_options_alone_select_from_the_test_folder():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-k", "serve_command_follows"],
                         cwd=REPO, capture_output=True, text=True).stdout
    assert "tests/compress/test_serve_hint.py::test_serve_command_follows_the_installed_vllm" in out
    assert "1/" in out.splitlines()[-1] or out.splitlines()[-1].startswith("1 test")
