"""QK fine-tuning reduces its objective in a few steps and changes nothing but the q/k side."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.compress.models import calib_windows, tiny_model
from vllm_thinkv.cli import main
from vllm_thinkv.compress import compress_model
from vllm_thinkv.compress.finetune import FinetuneConfig, finetune
from vllm_thinkv.config import CompressRequest, ThinKVConfig
from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.hf import load
from vllm_thinkv.hf.thin_model import make_thin

QK = ("q_proj", "k_proj", "q_basis", "k_basis")


@pytest.mark.parametrize("method, objective", [("pairs", "local"), ("pca", "local"), ("svd", "kl")])
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
    assert main(["finetune", str(thin), str(tuned), "--steps", "1", *fast]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["finetune", str(tiny_llama_dir), str(tmp_path / "x"), *fast]) == 2
    assert "not a thin-key checkpoint" in capsys.readouterr().err
