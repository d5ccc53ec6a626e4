"""`thinkv capacity`: output files, bad input (exit 2, one line naming the problem), no vLLM import."""

import json
import subprocess
import sys

import pytest

from vllm_thinkv.cli import main


def run_cli(capsys, *argv):
    code = main(["capacity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-model"], "unknown model 'no-such-model'"),
        (["llama-3.1-8b", "--rank", "256"], "--rank 256 is not supported: it must be a multiple of 8 from 8 to 128 (the model's head_dim)"),
        (["llama-3.1-8b", "--rank", "20"], "a multiple of 8 from 8 to 128"),
        (["llama-3.1-8b", "--snapkv-budget", "-1"], "--snapkv-budget must be a positive number of tokens, got -1"),
        (["llama-3.1-8b", "--snapkv-budget", "32", "--snapkv-window", "32"], "--snapkv-window must be in [1, budget)"),
        (["llama-3.1-8b", "--context", "512"], "--context 512 must exceed --output-tokens 512"),
        (["llama-3.1-70b"], "leave no KV memory on 1 × 80 GiB"),
        (["llama-3.1-8b", "--kv-mem", "-2"], "--kv-mem must be positive"),
        (["llama-3.1-8b", "mistral-7b", "--gpus", "1", "2", "4"], "--gpus takes one value or one per model (2), got 3"),
    ],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("thinkv capacity: error: ")
    assert message in err


def test_unreadable_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, str(tmp_path))
    assert code == 2 and "cannot read" in err


def test_writes_json_and_markdown(capsys, tmp_path, tiny_llama_dir):
    prefix = tmp_path / "cap"
    code, out, _ = run_cli(capsys, "mistral-7b", str(tiny_llama_dir / "config.json"), "--context", "4096",
                           "--output-tokens", "96", "--kv-mem", "2", "--out", str(prefix))
    assert code == 0
    result = json.loads((tmp_path / "cap.json").read_text())
    assert out == (tmp_path / "cap.md").read_text() + "\n"
    assert [m["model"] for m in result["models"]] == ["mistral-7b", tiny_llama_dir.name]
    tiny = result["models"][1]
    assert tiny["kv_budget_gib"] == 2
    # tiny Llama: 4 layers, 2 KV heads, d = 64, fp32; thin default r = 16
    assert tiny["kv_bytes_per_token"] == {"stock": 4 * 2 * 128 * 4, "thin": 4 * 2 * (16 + 64) * 4}
    row = tiny["contexts"][0]
    blocks = 2 * 2**30 // (4 * 2 * 128 * 4 * 16)
    assert row["max_sequences"]["stock"] == (blocks - 1) // (4096 // 16)
    assert row["beyond_native_context"] is False
    for key in ("date", "command", "device"):
        assert result[key]


def test_does_not_import_vllm():
    code = ("import sys, contextlib, io\nfrom vllm_thinkv.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['capacity', 'qwen3-8b']) == 0\n"
            "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'vllm imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_issues_four_models_in_one_table(capsys, tmp_path):
    """The shipped table: the 8B-class models on one 80 GB GPU, Llama-3.1-70B on four (its bf16
    weights alone, 131 GiB, exceed one); the MHA reference row shows the paper's 25 GB."""
    code, out, _ = run_cli(capsys, "llama-3.1-8b", "mistral-7b", "qwen3-8b", "llama-3.1-70b", "llama-2-7b",
                           "--gpus", "1", "1", "1", "4", "1", "--out", str(tmp_path / "cap"))
    assert code == 0
    result = json.loads((tmp_path / "cap.json").read_text())
    models = {m["model"]: m for m in result["models"]}
    assert [m["gpus"] for m in result["models"]] == [1, 1, 1, 4, 1]
    assert models["llama-3.1-70b"]["kv_budget_gib"] == pytest.approx(4 * 80 * 0.9 - models["llama-3.1-70b"]["weights_gib"])
    for m in models.values():
        assert [c["context"] for c in m["contexts"]] == [8192, 32768, 131072]
    assert "| llama-3.1-70b | 131072 |" in out and "4 × 80 GiB" in out
    assert "llama-2-7b (MHA), 131072 tokens: stock 64.0 GiB per user, thin keys 40.0 GiB, saved 25.8 GB" in out
    assert "llama-3.1-8b (GQA (4 q/kv)), 131072 tokens: stock 16.0 GiB per user, thin keys 10.0 GiB, saved 6.4 GB" in out


def test_merge_policy_counts_its_per_token_count(capsys, tiny_llama_dir):
    """`--snapkv-policy merge`: the SnapKV columns use pages of (r + d) values + 16 bytes per token and KV
    head, computed here by hand; the other policies keep the full cache's pages."""
    args = [str(tiny_llama_dir / "config.json"), "--context", "4096", "--output-tokens", "96", "--kv-mem", "2",
            "--snapkv-budget", "128", "--snapkv-window", "16", "--json"]
    results = {}
    for policy in ("snapkv", "keydiff", "merge"):
        code, out, _ = run_cli(capsys, *args, "--snapkv-policy", policy)
        assert code == 0
        results[policy] = json.loads(out)["models"][0]
    # tiny Llama: 4 layers, 2 KV heads, d = 64, fp32; thin default r = 16; block 16
    for policy, extra in (("snapkv", 0), ("keydiff", 0), ("merge", 16)):
        m = results[policy]
        assert m["snapkv_cache_blocks"] == {"stock": 2 * 2**30 // (16 * 4 * 2 * (128 * 4 + extra)),
                                            "thin": 2 * 2**30 // (16 * 4 * 2 * ((16 + 64) * 4 + extra))}
        assert m["cache_blocks"] == results["snapkv"]["cache_blocks"]  # the stock and thin columns do not depend on the policy
    seqs = {p: results[p]["contexts"][0]["max_sequences"] for p in results}
    assert seqs["merge"]["snapkv"] < seqs["snapkv"]["snapkv"] and seqs["keydiff"] == seqs["snapkv"]
    assert seqs["merge"]["stock"] == seqs["snapkv"]["stock"]


def test_unknown_policy_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "llama-3.1-8b", "--snapkv-policy", "h2o")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'h2o'" in err and "merge" in err
