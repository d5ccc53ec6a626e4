"""The worker-side life of requests: prefill rows, the compaction step, gaps."""

from vllm_thinkv.snapkv import SnapKVConfig
from vllm_thinkv.snapkv.tracker import SnapKVTracker

CONFIG = SnapKVConfig(budget=40, window=8)  # prompts longer than 48 are compacted


def step(tracker, rows):
    """rows: (first_block, q_len, seq_len_after_step, is_prefilling)"""
    starts = [0]
    for _, q, _, _ in rows:
        starts.append(starts[-1] + q)
    return tracker.step([r[0] for r in rows], starts, [r[2] for r in rows], [r[3] for r in rows])


def test_chunked_prefill_then_compaction_then_gaps():
    t = SnapKVTracker(CONFIG)
    s = step(t, [(7, 64, 64, True)])
    assert s.restart_rows == [0] and s.window_rows == [0] and not s.compactions and not s.has_gaps
    s = step(t, [(7, 36, 100, True)])
    assert s.restart_rows == [] and s.window_rows == [0] and not s.compactions
    s = step(t, [(7, 1, 101, False)])  # first row after the prompt: compaction, then its attention skips the gap
    assert [(c.row, c.first_block, c.prompt_len, c.kept_len) for c in s.compactions] == [(0, 7, 100, 48)]
    assert s.gaps == [(48, 100)]
    s = step(t, [(7, 1, 102, False)])
    assert not s.compactions and s.gaps == [(48, 100)]


def test_mixed_batch_short_prompt_and_recompute():
    t = SnapKVTracker(CONFIG)
    step(t, [(3, 100, 100, True), (9, 20, 20, True)])
    s = step(t, [(3, 1, 101, False), (9, 1, 21, False), (12, 30, 30, True)])
    assert [c.first_block for c in s.compactions] == [3]  # the 20-token prompt is too short
    assert s.gaps == [(48, 100), (0, 0), (0, 0)]
    assert s.window_rows == [2] and s.restart_rows == [2]
    # Request 3 is preempted and recomputed (prompt + 1 generated token) in one chunk starting at 0.
    s = step(t, [(3, 101, 101, True)])
    assert s.restart_rows == [0] and s.gaps == [(0, 0)]
    s = step(t, [(3, 1, 102, False)])
    assert [(c.prompt_len, c.kept_len) for c in s.compactions] == [(101, 48)]
    assert s.gaps == [(48, 101)]


def test_padding_rows_are_ignored():
    t = SnapKVTracker(CONFIG)
    s = step(t, [(5, 60, 60, True), (0, 0, 0, False)])
    assert s.window_rows == [0] and s.gaps == [(0, 0), (0, 0)]


def test_short_prompt_releases_its_window_and_recompute_chunk_past_the_prompt():
    t = SnapKVTracker(CONFIG)
    step(t, [(4, 30, 30, True)])
    s = step(t, [(4, 1, 31, False)])
    assert s.released == [4] and not s.compactions and s.gaps == [(0, 0)]
    # A recompute whose first row after the prompt is itself several tokens long (q_len > 1).
    step(t, [(6, 64, 64, True)])
    step(t, [(6, 40, 104, True)])
    s = step(t, [(6, 20, 124, False)])
    assert [(c.prompt_len, c.kept_len) for c in s.compactions] == [(104, 48)] and s.gaps == [(48, 104)]


def test_window_bound_releases_the_oldest_live_window_only():
    """Requests aborted during prefill never reach their compaction step: the layers' saved
    windows are bounded, oldest update first; compacted and too-short prompts never count."""
    t = SnapKVTracker(CONFIG, max_windows=2)
    step(t, [(1, 16, 16, True), (2, 10, 10, True)])  # 1 mid-prefill, 2 a 10-token prompt
    s = step(t, [(2, 1, 11, False), (3, 16, 16, True)])  # 2 turns out too short; 3 starts
    assert s.released == [2]  # not 1: the released window of 2 makes room
    s = step(t, [(4, 16, 16, True)])  # a third live window: the oldest (1) goes
    assert s.released == [1]
    s = step(t, [(3, 40, 56, True), (5, 8, 8, True)])  # 3 updated, 5 new: 4 is now the oldest
    assert s.released == [4]
    s = step(t, [(3, 1, 57, False)])  # 3 compacted: its window leaves without a release
    assert [c.first_block for c in s.compactions] == [3] and s.released == []
    unbounded = SnapKVTracker(CONFIG)
    for block in range(1, 50):
        assert step(unbounded, [(block, 16, 16, True)]).released == []
