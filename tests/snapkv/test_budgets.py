"""Per-request SnapKV budgets: parsing and admission checks, the one resolution rule,
and the worker tracker applying each row's own budget."""

import importlib

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.budgets import RequestBudget, kept_len
from vllm_thinkv.snapkv.requests import SnapKVRequestBudgets
from vllm_thinkv.snapkv.tracker import SnapKVTracker


@pytest.mark.parametrize("extra, want", [
    (None, None),
    ({}, None),
    ({"other_plugin": 3}, None),
    ({"thinkv_snapkv_budget": 64}, RequestBudget(budget=64)),
    ({"thinkv_snapkv_budget": "off"}, RequestBudget(off=True)),
    ({"thinkv_snapkv_budget_ratio": 0.25}, RequestBudget(budget_ratio=0.25)),
])
def test_parse(extra, want):
    assert RequestBudget.from_extra_args(extra) == want


@pytest.mark.parametrize("extra, message", [
    ({"thinkv_snapkv_budget": -5}, "thinkv_snapkv_budget must be a positive integer"),
    ({"thinkv_snapkv_budget": 0}, "thinkv_snapkv_budget must be a positive integer"),
    ({"thinkv_snapkv_budget": 12.5}, "got 12.5"),
    ({"thinkv_snapkv_budget": "lots"}, "got 'lots'"),
    ({"thinkv_snapkv_budget": True}, "got True"),
    ({"thinkv_snapkv_budget_ratio": 1.5}, "thinkv_snapkv_budget_ratio must be a number in (0, 1)"),
    ({"thinkv_snapkv_budget_ratio": "half"}, "got 'half'"),
    ({"thinkv_snapkv_budget": 64, "thinkv_snapkv_budget_ratio": 0.5}, "not both"),
    ({"thinkv_snapkv_window": 8}, "unknown per-request SnapKV key(s) ['thinkv_snapkv_window']"),
])
def test_bad_values_fail_admission(extra, message):
    with pytest.raises(ValueError) as err:
        RequestBudget.from_extra_args(extra)
    assert message in str(err.value)
    # vLLM's admission hook: a VLLMValidationError is an HTTP 400 on the OpenAI server
    with pytest.raises(VLLMValidationError) as err:
        SnapKVRequestBudgets.validate_params(SamplingParams(extra_args=extra))
    assert message in str(err.value)


def test_good_values_pass_admission():
    for extra in (None, {"thinkv_snapkv_budget": 8}, {"thinkv_snapkv_budget": "off"}, {"thinkv_snapkv_budget_ratio": 0.9}):
        SnapKVRequestBudgets.validate_params(SamplingParams(extra_args=extra))


def test_kept_len_resolves_against_the_deployment():
    deployment = SnapKVConfig(budget=100, window=16)
    assert kept_len(deployment, None, 1000) == 116  # no setting: the deployment's
    assert kept_len(deployment, RequestBudget(budget=8), 1000) == 24  # smaller than the window is fine
    assert kept_len(deployment, RequestBudget(budget_ratio=0.25), 1000) == 266
    assert kept_len(deployment, RequestBudget(off=True), 1000) is None
    assert kept_len(deployment, RequestBudget(budget=990), 1000) is None  # too short for that budget
    capped = SnapKVConfig(budget=100, window=16, max_budget=300)
    assert kept_len(capped, RequestBudget(budget=5000), 1000) == 316
    assert kept_len(capped, RequestBudget(budget_ratio=0.5), 1000) == 316
    assert kept_len(capped, RequestBudget(off=True), 1000) == 316  # the cap holds for `off` too
    assert kept_len(capped, RequestBudget(budget=50), 1000) == 66
    assert kept_len(SnapKVConfig(budget_ratio=0.5, window=16, max_budget=300), None, 1000) == 316


def test_above_max_is_the_one_refusal_rule():
    capped = SnapKVConfig(budget=100, window=16, max_budget=300)
    assert RequestBudget(budget=301).above_max(capped) == "thinkv_snapkv_budget 301 is above this deployment's max_budget (300)"
    assert RequestBudget(off=True).above_max(capped) == \
        'thinkv_snapkv_budget "off" (no compaction) is above this deployment\'s max_budget (300)'
    assert RequestBudget(budget=300).above_max(capped) is None
    assert RequestBudget(budget_ratio=0.99).above_max(capped) is None  # depends on the prompt: capped, never refused
    for request in (RequestBudget(budget=5000), RequestBudget(off=True)):
        assert request.above_max(SnapKVConfig(budget=100, window=16)) is None  # no max_budget: anything goes


def test_max_budget_validation():
    with pytest.raises(ThinKVError, match=r"budget \(400\) exceeds max_budget \(300\)"):
        SnapKVConfig(budget=400, window=16, max_budget=300)
    with pytest.raises(ThinKVError, match="max_budget must be a positive integer"):
        SnapKVConfig(budget=40, window=16, max_budget=-1)


def test_tracker_applies_each_rows_budget():
    """Three requests compacted in one step: row 0 the deployment's budget, row 1 its own,
    row 2 off; the gaps follow."""
    t = SnapKVTracker(SnapKVConfig(budget=40, window=8))
    rows = {1: RequestBudget(budget=10), 2: RequestBudget(off=True)}
    t.step([5, 6, 7], [0, 100, 200, 300], [100, 100, 100], [True] * 3, rows)
    s = t.step([5, 6, 7], [0, 1, 2, 3], [101, 101, 101], [False] * 3, rows)
    assert [(c.row, c.kept_len) for c in s.compactions] == [(0, 48), (1, 18)]
    assert s.released == [7]
    assert s.gaps == [(48, 100), (18, 100), (0, 0)]


def fake_vllm_config(snapkv: dict | None):
    from types import SimpleNamespace

    hf_config = SimpleNamespace(**({"thinkv_snapkv": snapkv} if snapkv is not None else {}))
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))


def test_processor_refuses_a_deployment_without_snapkv():
    with pytest.raises(ThinKVError, match="per-request SnapKV budgets .* need a SnapKV deployment"):
        SnapKVRequestBudgets(fake_vllm_config(None), torch.device("cpu"), False)


def test_processor_follows_rows_and_the_builder_finds_it():
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from vllm_thinkv.snapkv.requests import processor_for

    config = fake_vllm_config({"budget": 64, "window": 16})
    proc = SnapKVRequestBudgets(config, torch.device("cpu"), False)
    assert processor_for(config) is proc and processor_for(fake_vllm_config(None)) is None
    params = [SamplingParams(extra_args=e) for e in ({"thinkv_snapkv_budget": 8}, None, {"thinkv_snapkv_budget": "off"})]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(i, p, [], []) for i, p in enumerate(params)],
                                  moved=[]))
    assert proc.rows == {0: RequestBudget(budget=8), 2: RequestBudget(off=True)}
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.rows == {0: RequestBudget(off=True)}
    logits = torch.randn(2, 5)
    assert torch.equal(proc.apply(logits.clone()), logits) and proc.is_argmax_invariant()


def test_processor_named_recognises_vllms_forms():
    from vllm_thinkv.snapkv.requests import PROCESSOR, processor_named

    assert processor_named([PROCESSOR]) and processor_named(["x:Y", SnapKVRequestBudgets])
    assert processor_named([PROCESSOR.replace(":", ".")])
    assert not processor_named(None) and not processor_named([]) and not processor_named(["x:SnapKVRequestBudgets"])
    module, name = PROCESSOR.split(":")  # the name spelled in snapkv.budgets (for thinkv serve) is the class's
    assert getattr(importlib.import_module(module), name) is SnapKVRequestBudgets


class _Request:
    def __init__(self, request_id: str, extra_args):
        self.request_id = request_id
        self.sampling_params = SamplingParams(extra_args=extra_args)


@pytest.mark.parametrize("per_request", [False, True])
def test_manager_reads_request_budgets_only_where_the_worker_does(per_request):
    """Without the processor the worker applies the deployment's budget to every request, so the
    KV manager must too (a request's keys are ignored, never half-applied, and never raise);
    with it, both read the request's own budget."""
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_thinkv.snapkv.kv_cache import SnapKVManager, SnapKVSpec

    deployment = SnapKVConfig(budget=64, window=16, per_request=per_request)
    spec = SnapKVSpec.from_spec(FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=16, head_size_v=64,
                                                  dtype=torch.float32), deployment)
    manager = SnapKVManager(spec, block_pool=BlockPool(64, False, 16), enable_caching=False,
                            kv_cache_group_id=0, scheduler_block_size=16)
    assert manager.enable_caching is per_request  # the coordinator calls cache_blocks only then
    manager.allocate_new_blocks("a", 32, 32)
    manager.cache_blocks(_Request("a", {"thinkv_snapkv_budget": 8}), 32, replay_boundaries=[])
    if not per_request:
        manager.allocate_new_blocks("b", 32, 32)
        manager.cache_blocks(_Request("b", {"thinkv_snapkv_budget": -1}), 32, replay_boundaries=[])  # ignored
    assert manager._requests == ({"a": RequestBudget(budget=8)} if per_request else {})


def test_per_request_is_not_a_user_setting():
    with pytest.raises(ThinKVError, match=r"unknown keys \['per_request'\]"):
        SnapKVConfig.from_dict({"budget": 64, "per_request": True})


def test_settings_round_trip_without_the_deployment_flag():
    """to_dict gives the `thinkv_snapkv` settings (as tests and benchmarks pass them to vLLM)."""
    config = SnapKVConfig(budget=64, window=16, sinks=2, per_request=True)
    assert "per_request" not in config.to_dict()
    assert SnapKVConfig.from_dict(config.to_dict()) == SnapKVConfig(budget=64, window=16, sinks=2)
