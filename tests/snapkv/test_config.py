import pytest

from vllm_thinkv.errors import ThinKVError
from vllm_thinkv.snapkv import SnapKVConfig


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"budget": 0}, "budget must be a positive integer, got 0"),
        ({"budget": -5}, "budget must be a positive integer, got -5"),
        ({"budget": 32, "window": 32}, "window (32) must be smaller than budget (32)"),
        ({"budget": 64, "window": 0}, "window must be a positive integer"),
        ({"budget": 64, "pooling": "median"}, "unknown pooling 'median' (supported: max, avg)"),
        ({"budget": 64, "kernel_size": 4}, "kernel_size must be an odd integer >= 1, got 4"),
        ({"budget": 64, "kernel_size": 0}, "kernel_size must be an odd integer >= 1, got 0"),
        ({"budget_ratio": 0.0}, "budget_ratio must be in (0, 1), got 0.0"),
        ({"budget_ratio": 1.0}, "budget_ratio must be in (0, 1), got 1.0"),
        ({"budget_ratio": 1.5}, "budget_ratio must be in (0, 1)"),
        ({}, "give exactly one of `budget`"),
        ({"budget": 64, "budget_ratio": 0.5}, "give exactly one of `budget`"),
        ({"budget": 64, "windw": 8}, "unknown keys ['windw']"),
        ({"budget": 64, "sinks": -1}, "sinks must be a non-negative integer (first prompt tokens always kept), got -1"),
        ({"budget": 64, "sinks": 2.5}, "sinks must be a non-negative integer"),
        ({"budget": 64, "sinks": True}, "sinks must be a non-negative integer"),
        ({"budget": 64, "sinks": 64}, "sinks (64) must be smaller than budget (64)"),
        ({"budget": 64, "policy": "h2o"},
         "unknown policy 'h2o' (supported: snapkv, recent, value_aware, keydiff, merge)"),
    ],
)
def test_bad_settings_are_rejected_with_the_reason(settings, message):
    with pytest.raises(ThinKVError) as err:
        SnapKVConfig.from_dict(settings)
    assert message in str(err.value)
    assert str(err.value).startswith("thinkv_snapkv")


def test_kept_length():
    c = SnapKVConfig(budget=1024, window=32)
    assert c.kept_len(4096) == 1056
    assert c.kept_len(1056) is None  # not longer than budget + window: nothing to compact
    r = SnapKVConfig(budget_ratio=0.25, window=16)
    assert r.kept_len(4000) == 1016
    assert r.kept_len(20) is None


def test_absent_means_off():
    class HF:
        pass

    assert SnapKVConfig.from_hf_config(HF()) is None
    hf = HF()
    hf.thinkv_snapkv = {"budget": 256, "window": 16}
    assert SnapKVConfig.from_hf_config(hf) == SnapKVConfig(budget=256, window=16)


def test_unknown_policy_rejected():
    with pytest.raises(ThinKVError, match="unknown policy 'oldest' \\(supported: snapkv, recent, value_aware, keydiff, merge\\)"):
        SnapKVConfig(budget=64, policy="oldest")


def test_tensor_parallel_must_not_replicate_kv_heads():
    from vllm_thinkv.snapkv.config import check_tensor_parallel

    check_tensor_parallel(num_kv_heads=4, tp_size=4)
    with pytest.raises(ThinKVError, match=r"tensor-parallel size \(2\) exceeds the model's 1 KV heads.*at most 1"):
        check_tensor_parallel(num_kv_heads=1, tp_size=2)
