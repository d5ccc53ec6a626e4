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
    assert command.split("-m pytest", 1)[1].split(";")[0].split() == [
        "-ra", "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", "tests/snapkv", "-x", "-k", "tracker"]
    serial = subprocess.run(["make", "-n", "test", "PYTEST_WORKERS=0", "PYTEST_ARGS=-x"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    assert "-m pytest -ra -n 0 --dist loadfile --no-loadscope-reorder -x;" in serial


def test_options_alone_select_from_the_test_folder():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-k", "serve_command_follows"],
                         cwd=REPO, capture_output=True, text=True).stdout
    assert "tests/compress/test_serve_hint.py::test_serve_command_follows_the_installed_vllm" in out
    assert "1/" in out.splitlines()[-1] or out.splitlines()[-1].startswith("1 test")


def test_vllm033_stage_runs_its_selection_in_its_own_venv_and_ci_fails_with_it():
    out = subprocess.run(["make", "-n", "test-vllm033", "PYTEST_ARGS=-x -k selector"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    command = " ".join(out.split("\\\n")).split("-m pytest", 1)
    prefix, args = command[0].split(), command[1].split(";")[0].split()
    assert prefix[-1] == ".venv-vllm033/bin/python" and prefix[-2] == f"LD_LIBRARY_PATH={REPO}/.venv-vllm033/cuda-stub"
    assert args[:3] == ["-ra", "-p", "tests.vllm033.sm90"] and args[-3:] == ["-x", "-k", "selector"]
    assert {"tests/vllm033", "tests/snapkv", "tests/kernels/test_compile.py"} <= set(args)
    assert "if [ $rc -eq 5 ]" in out and "exit 1" in out  # no tests collected fails the stage
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test; suite=$?" in ci and "make test-vllm033; vllm033=$?" in ci
    assert ci.rstrip().endswith('[ "$suite" -eq 0 ] && [ "$vllm033" -eq 0 ]')


def test_vllm033_folder_is_refused_without_its_platform_plugin():
    """Plain `pytest` skips it (tests/conftest.py); naming it is an error that says what to run."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/vllm033"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "use `make test-vllm033`" in out.stdout + out.stderr, out.stdout[-2000:]
