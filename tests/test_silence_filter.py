"""The online silence filter equals upstream's whole-sequence remove_long_silence, code for code."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine_ref.generate import SILENT_TOKEN, SilenceFilter, remove_long_silence


def _online(codes: list[int]) -> tuple[list[int], list[int]]:
    f = SilenceFilter()
    out, ready_at = [], []
    for i, c in enumerate(codes):
        new = f.feed(c)
        out.extend(new)
        ready_at.extend([i] * len(new))
    out.extend(f.finish())
    return out, ready_at


codes = st.lists(st.one_of(st.just(SILENT_TOKEN), st.integers(0, 60)), max_size=300)


@settings(max_examples=400, deadline=None)
@given(codes)
def test_online_equals_whole_sequence(seq):
    assert _online(seq)[0] == remove_long_silence(seq)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([SILENT_TOKEN, 7]), max_size=200))
def test_online_equals_whole_sequence_with_long_runs(seq):
    assert _online(seq)[0] == remove_long_silence(seq)


def test_codes_are_released_without_delay_while_runs_stay_short():
    seq = ([1, 2] + [SILENT_TOKEN] * 10) * 4 + [3]
    out, ready_at = _online(seq)
    assert out == remove_long_silence(seq) == seq
    assert ready_at == list(range(len(seq)))  # each code certain the moment it is generated


def test_a_long_run_is_held_until_the_trigger_decides():
    seq = [1] + [SILENT_TOKEN] * 25 + [2] + [SILENT_TOKEN] * 10 + [3]
    f = SilenceFilter()
    released = [f.feed(c) for c in seq]
    assert released[11] == []  # the 11th silent code of a run: its fate depends on the total
    assert sum(map(len, released)) + len(f.finish()) == len(remove_long_silence(seq))
