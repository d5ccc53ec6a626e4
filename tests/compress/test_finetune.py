"""QK fine-tuning reduces its objective in a few steps and changes nothing but the q/k side."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.compress.models import calib_windows, tiny_model
from vllm_thinkv.cli import main
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.finetune import FinetuneConfig, finetune, loss_curve
from vllm_thinkv.config import CompressRequest, ThinKVConfig
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf import load
from vllm_thinkv.hf.thin_model import make_thin

QK = ("q_proj", "k_proj", "q_basis", "k_basis")


@pytest.mark.parametrize("method, objective", [("pairs", "local"), ("pca", "local"), ("svd", "kl"), ("joint", "local"),
                                               ("joint", "kl")])
def test_finetune_reduces_objective_and_touches_only_qk(method, objective):
    model = tiny_model("qwen2")  # biases train too
    windows = calib_windows(model, n=2, ctx=48)
    cfg, tensors = compress_model(model, CompressRequest(method, rank=16), windows, progress=False)
    student = make_thin(copy.deepcopy(model), cfg, tensors)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    log = finetune(student, model, windows, FinetuneConfig(objective=objective, steps=12, lr=3e-2), progress=False)
    assert log["after"] < 0.9 * log["before"]
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(q in k for q in QK) for k in changed), changed
    assert not any("rope_inv_freq" in k for k in changed)
    assert student.config.thinkv["finetuned"] is True
    assert all(not p.requires_grad for p in student.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.state_dict().items())  # teacher untouched


@pytest.mark.parametrize("bases_only", [False, True])
def test_pca_finetune_trains_the_projections_unless_bases_only(bases_only):
    model = tiny_model("llama")
    windows = calib_windows(model, n=2, ctx=48)
    cfg, tensors = compress_model(model, CompressRequest("pca", rank=16), windows, progress=False)
    student = make_thin(copy.deepcopy(model), cfg, tensors)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    log = finetune(student, model, windows, FinetuneConfig(steps=5, lr=3e-2, bases_only=bases_only), progress=False)
    changed = {k.split(".")[-2 if k.endswith(("weight", "bias")) else -1] for k, v in student.state_dict().items()
               if not torch.equal(before[k], v)}
    assert changed == ({"q_basis", "k_basis"} if bases_only else {"q_basis", "k_basis", "q_proj", "k_proj"})
    assert log["after"] < log["before"]
    assert [c[0] for c in log["curve"]] == list(range(5)) and all(len(x["curve"]) == 5 for x in log["layers"])


def test_layer_inputs_reproduce_gemma3s_forward():
    """The local objective's per-layer inputs on Gemma 3 (sliding layers over 32 tokens with their own RoPE
    base, a global layer): running the decoder layers with them gives transformers' own hidden states on a
    96-token window, past the window; one causal mask for every layer would not."""
    from vllm_thinkv.compress.finetune import _causal_mask, _layer_kwargs

    model = tiny_model("gemma3", num_layers=3)
    ids = calib_windows(model, n=1, ctx=96)
    pos = torch.arange(96)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        h = model.model.embed_tokens(ids)
        wrong = h.clone()
        for i, (layer, kw) in enumerate(zip(model.model.layers, _layer_kwargs(model, h, pos))):
            h = layer(h, **kw)
            wrong = layer(wrong, **{**kw, "attention_mask": _causal_mask(96, h.dtype, h.device)})
            if i < 2:  # the last entry of hidden_states is after the final norm
                torch.testing.assert_close(h, ref[i + 1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(wrong, h, atol=1e-3)


@pytest.mark.parametrize("method", ["pca", "joint"])
def test_finetune_local_on_gemma3(method):
    model = tiny_model("gemma3", num_layers=3)
    windows = calib_windows(model, n=2, ctx=80)
    cfg, tensors = compress_model(model, CompressRequest(method, rank=16), windows, progress=False)
    student = make_thin(copy.deepcopy(model), cfg, tensors)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    log = finetune(student, model, windows, FinetuneConfig(steps=10, lr=3e-2), progress=False)
    assert log["after"] < 0.9 * log["before"]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(any(q in k for q in QK) for k in changed), changed


def test_loss_curve_buckets():
    assert loss_curve([1.0, 3.0, 5.0], points=2) == [[0, 2.0], [2, 5.0]]
    assert loss_curve([4.0] * 64, points=32)[-1] == [62, 4.0] and len(loss_curve([4.0] * 64)) == 32


def test_finetune_refuses_an_original_model():
    model = tiny_model("llama")
    with pytest.raises(ThinKVError, match="needs a thin-key model"):
        finetune(copy.deepcopy(model), model, calib_windows(model), FinetuneConfig(steps=1))


def test_finetune_cli_writes_a_finetuned_checkpoint(tiny_llama_dir, tmp_path, capsys):
    thin, tuned = tmp_path / "thin", tmp_path / "tuned"
    fast = ["--no-progress"]
    assert main(["compress", str(tiny_llama_dir), str(thin), "--method", "svd", "--rank", "16",
                 "--calib-tokens", "256", "--calib-ctx", "128", *fast]) == 0
    assert main(["finetune", str(thin), str(tuned), "--steps", "3", "--ctx", "64", "--windows", "2", *fast]) == 0
    section = ThinKVConfig.from_dict(json.loads((tuned / "config.json").read_text())["thinkv"])
    assert section.finetuned and section.ranks == (16,) * 4
    assert section.calibration["finetune"]["objective"] == "local"
    load(tuned)  # loads strictly
    pca, pca_tuned = tmp_path / "pca", tmp_path / "pca-tuned"
    assert main(["compress", str(tiny_llama_dir), str(pca), "--method", "pca", "--rank", "16",
                 "--calib-tokens", "256", "--calib-ctx", "128", *fast]) == 0
    assert main(["finetune", str(pca), str(pca_tuned), "--steps", "3", "--ctx", "64", "--windows", "2", "--lr", "3e-2", *fast]) == 0
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(load(pca_tuned).state_dict()[q], load(pca).state_dict()[q])  # fine-tuned q_proj is saved
    assert main(["finetune", str(thin), str(tuned), "--steps", "1", *fast]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["finetune", str(tiny_llama_dir), str(tmp_path / "x"), *fast]) == 2
    assert "not a thin-key checkpoint" in capsys.readouterr().err
