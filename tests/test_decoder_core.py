"""Continuous batching over the exported decoder: every request gets exactly what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_ref.beam_search import decode_beams
from engine_ref.generate import decode_sampling, latent_pass, remove_long_silence
from engine_ref.indextts.loader import load_model
from engine_ref.sampling import GenerationParams
from export.runtime import OrtDecoder
from model_repository.decoder_core import (CANCEL_MEMORY_S, DecoderScheduler, QueueFull, SequenceRequest,
                                           run_to_completion)

TEXTS = [[5, 6, 7, 8, 9], [20, 21], [30, 31, 32, 33, 34, 35, 36, 37], [40], [50, 51, 52], [60, 61, 62, 63],
         [70, 71, 72, 73, 74, 75], [80, 81]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def decoder(tiny_export_dir) -> OrtDecoder:
    return OrtDecoder.from_manifest(tiny_export_dir)


@pytest.fixture(scope="module")
def conds(model) -> torch.Tensor:
    return torch.randn(1, 32, model.config.gpt.model_dim, generator=torch.Generator().manual_seed(2))


def _req(i: int, conds, params: GenerationParams, results: dict, seed: int = 0) -> SequenceRequest:
    return SequenceRequest(f"s{i}", conds.numpy()[0], TEXTS[i], params, seed, on_done=lambda r: results.__setitem__(r.seq_id, r))


def _reference(model, conds, i: int, params: GenerationParams, seed: int = 0):
    fn = decode_beams if params.num_beams > 1 else decode_sampling
    out = fn(model.gpt, conds, [TEXTS[i]], [params], [seed])[0]
    codes = remove_long_silence(out.codes)
    lat = latent_pass(model.gpt, conds, [TEXTS[i]], [codes])[0].numpy() if codes else None
    return codes, out.stopped, lat


def _check(result, ref):
    codes, stopped, lat = ref
    assert result.codes == codes and result.stopped == stopped and not result.cancelled
    if lat is not None:
        np.testing.assert_allclose(result.latents, lat, rtol=1e-4, atol=1e-5)


def test_eight_concurrent_greedy_requests_equal_each_alone(model, decoder, conds):
    params = GenerationParams.greedy(max_mel_tokens=60)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=8)
    run_to_completion(sched, [_req(i, conds, params, results) for i in range(8)])
    assert sched.stats.last_batch_rows <= 8 and sched.stats.sequences_done == 8
    for i in range(8):
        _check(results[f"s{i}"], _reference(model, conds, i, params))
    assert sched._state is None and not sched._live  # everything freed


def test_request_joining_mid_generation_is_unaffected(model, decoder, conds):
    params = GenerationParams.greedy(max_mel_tokens=60)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=4)
    first = _req(0, conds, params, results)
    sched.submit(first)
    for _ in range(7):
        sched.iterate()
    assert sched.stats.active == 1
    run_to_completion(sched, [_req(2, conds, params, results), _req(3, conds, params, results)])
    while "s0" not in results:
        sched.iterate()
    for i in (0, 2, 3):
        _check(results[f"s{i}"], _reference(model, conds, i, params))


def test_per_request_sampling_and_beams_inside_one_batch(model, decoder, conds):
    """Different parameters in one batch: seeded sampling, deterministic 3-beam search, beam sampling, greedy."""
    cases = {
        0: (GenerationParams(num_beams=1, top_k=20, top_p=0.9, temperature=0.8, max_mel_tokens=50), 11),
        1: (GenerationParams(do_sample=False, num_beams=3, max_mel_tokens=50), 0),
        2: (GenerationParams(num_beams=3, max_mel_tokens=50), 5),  # upstream default: beam sampling
        3: (GenerationParams.greedy(max_mel_tokens=50), 0),
    }
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=4)
    run_to_completion(sched, [_req(i, conds, p, results, seed) for i, (p, seed) in cases.items()])
    for i, (p, seed) in cases.items():
        _check(results[f"s{i}"], _reference(model, conds, i, p, seed))


def test_cancel_stops_within_one_step_and_frees_rows(decoder, conds):
    params = GenerationParams.greedy(max_mel_tokens=200)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=4)
    sched.submit(_req(0, conds, params, results))
    sched.submit(_req(1, conds, params, results))
    for _ in range(3):
        sched.iterate()
    rows_before = sched._state.batch
    sched.cancel("s0")
    sched.iterate()
    assert results["s0"].cancelled and results["s0"].latents is None
    assert sched._state.batch == rows_before - 1 and sched.stats.sequences_cancelled == 1
    flag = {"c": False}
    sched.submit(SequenceRequest("s9", conds.numpy()[0], TEXTS[2], params, 0,
                                 on_done=lambda r: results.__setitem__(r.seq_id, r), is_cancelled=lambda: flag["c"]))
    sched.iterate()
    flag["c"] = True  # e.g. the client disconnected: noticed at the next step
    sched.iterate()
    assert results["s9"].cancelled
    while "s1" not in results:
        sched.iterate()
    assert not results["s1"].cancelled and sched._state is None


def test_bounded_sequences_and_queue(decoder, conds):
    params = GenerationParams.greedy(max_mel_tokens=30)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=2, max_queue=3)
    for i in range(3):
        sched.submit(_req(i, conds, params, results))
    with pytest.raises(QueueFull):
        sched.submit(_req(3, conds, params, results))
    peak = 0
    while len(results) < 3:
        sched.iterate()
        peak = max(peak, sched.stats.active)
    assert peak == 2


def test_a_failing_batch_fails_its_sequences_and_keeps_serving(decoder, conds):
    params = GenerationParams.greedy(max_mel_tokens=30)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=2).start()
    try:
        bad = SequenceRequest("bad", np.zeros((32, 7), np.float32), TEXTS[0], params, 0,  # wrong width
                              on_done=lambda r: results.__setitem__(r.seq_id, r))
        sched.submit(bad)
        good = _req(1, conds, params, results)
        import time

        deadline = time.monotonic() + 60
        while "bad" not in results and time.monotonic() < deadline:
            time.sleep(0.01)
        sched.submit(good)
        while "s1" not in results and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sched.stop()
    assert results["bad"].error and "decoder failure" in results["bad"].error
    assert results["s1"].error is None and results["s1"].codes


# --- fault isolation: one sequence's arithmetic can never fail another ------------------------------------------

def _raw(params: dict) -> GenerationParams:
    """Parameters as a request could carry them before validation (bypassing GenerationParams.validate)."""
    return GenerationParams(**params)


def test_a_temperature_that_overflows_fails_only_its_own_sequence(model, decoder, conds):
    """Regression: TEMPERATURE=1e-38 with sampling made softmax NaN, failed every live sequence and left its own
    request unanswered. Validation now refuses it; and if such a sequence reaches the scheduler anyway, it alone
    fails with a named error while the others decode exactly as alone."""
    from engine_ref.errors import InputError

    with pytest.raises(InputError, match="temperature"):
        _raw({"do_sample": True, "temperature": 1e-38, "num_beams": 1}).validate(model.config.gpt)
    greedy = GenerationParams.greedy(max_mel_tokens=40)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=4)
    bad = [_req(1, conds, _raw({"do_sample": True, "temperature": 1e-38, "num_beams": 1, "max_mel_tokens": 40}),
                results), _req(3, conds, _raw({"do_sample": True, "temperature": 1e-38, "num_beams": 3,
                                                "max_mel_tokens": 40}), results)]
    run_to_completion(sched, [_req(0, conds, greedy, results), *bad, _req(2, conds, greedy, results)])
    # With beams the joint softmax over 1e38-scaled scores is NaN: that sequence fails, named; the plain sampling
    # row happens to stay finite here (it samples greedily) and simply finishes.
    assert results["s3"].error and "decoding failed at step 1" in results["s3"].error
    assert results["s1"].error is None and results["s1"].codes
    for i in (0, 2):
        _check(results[f"s{i}"], _reference(model, conds, i, greedy))
    assert sched.alive and sched._state is None and not sched._live


def test_a_failing_prefill_or_latent_pass_fails_only_its_sequence(model, decoder, conds):
    """Out-of-range text ids make ORT raise inside the batched prefill: the batch is retried one by one."""
    greedy = GenerationParams.greedy(max_mel_tokens=30)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=4)
    broken = SequenceRequest("bad", conds.numpy()[0], [10**9], greedy, 0,
                             on_done=lambda r: results.__setitem__(r.seq_id, r))
    run_to_completion(sched, [_req(0, conds, greedy, results), broken, _req(4, conds, greedy, results)])
    assert results["bad"].error and "prefill" in results["bad"].error
    for i in (0, 4):
        _check(results[f"s{i}"], _reference(model, conds, i, greedy))


def test_a_dying_scheduler_thread_answers_everyone_and_reports_itself(decoder, conds):
    fatal: list = []
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=2, on_fatal=fatal.append)

    def explode() -> None:
        raise SystemExit("boom")  # not an Exception: escapes the per-iteration handler like a real thread death

    sched.iterate = explode
    sched.submit(_req(0, conds, GenerationParams.greedy(max_mel_tokens=5), results))
    sched.start()
    sched._thread.join(5)
    assert not sched.alive and fatal and results["s0"].error == "decoder scheduler stopped"
    with pytest.raises(QueueFull, match="stopped"):
        sched.submit(_req(1, conds, GenerationParams.greedy(), results))


def test_beam_rows_are_budgeted_per_step(decoder, conds):
    from engine_ref.errors import InputError

    sched = DecoderScheduler(decoder, max_sequences=8, max_rows=6)
    with pytest.raises(InputError, match="num_beams"):
        sched.submit(_req(0, conds, GenerationParams(num_beams=7, do_sample=False), {}))
    results: dict = {}
    reqs = [_req(i, conds, GenerationParams(num_beams=3, do_sample=False, max_mel_tokens=20), results)
            for i in range(3)]
    for r in reqs:
        sched.submit(r)
    sched.iterate()
    assert sum(lv.rows for lv in sched._live) <= 6 and len(sched._live) == 2  # the third waits for rows
    run_to_completion(sched, [])
    while len(results) < 3:
        sched.iterate()
    assert all(not r.error for r in results.values())


_finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.fixed_dictionaries({
    "do_sample": st.booleans(),
    "temperature": st.one_of(st.floats(1e-40, 1e-3), st.floats(1e-3, 200.0, **_finite), st.just(float("nan"))),
    "top_p": st.floats(-0.5, 1.5, **_finite),
    "top_k": st.integers(-3, 100),
    "repetition_penalty": st.one_of(st.floats(-2.0, 150.0, **_finite), st.just(float("inf"))),
    "num_beams": st.integers(1, 5),
    "max_mel_tokens": st.integers(1, 30),
    "seed": st.integers(0, 2**62),
}))
def test_fuzz_no_sequence_ever_fails_another(params, model, decoder, conds):
    """Over the whole parameter space: a request either fails validation with a named InputError, or decodes
    next to a greedy control without error; and even an unvalidated one can only fail itself."""
    from engine_ref.errors import InputError

    p = _raw(params)
    try:
        p.validate(model.config.gpt)
        valid = True
    except InputError:
        valid = False
    greedy = GenerationParams.greedy(max_mel_tokens=20)
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=4)
    run_to_completion(sched, [_req(0, conds, greedy, results), _req(5, conds, p, results, seed=params["seed"])])
    _check(results["s0"], _CONTROL.setdefault("s0", _reference(model, conds, 0, greedy)))
    if valid:
        assert not results["s5"].error, (params, results["s5"].error)
    assert sched.alive and sched._state is None


_CONTROL: dict = {}


def test_a_wide_beam_sequence_is_passed_by_narrow_ones_without_starving(decoder, conds):
    from model_repository import decoder_core

    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=8, max_rows=10)
    wide = [_req(i, conds, GenerationParams(num_beams=6, do_sample=False, max_mel_tokens=30), results)
            for i in range(2)]
    narrow = _req(2, conds, GenerationParams.greedy(max_mel_tokens=30), results)
    for r in (*wide, narrow):
        sched.submit(r)
    sched.iterate()
    # The second wide one does not fit next to the first; the greedy one behind it is admitted anyway.
    assert {lv.req.seq_id for lv in sched._live} == {"s0", "s2"} and wide[1].bypassed == 1
    wide[1].bypassed = decoder_core.MAX_BYPASS  # it has waited long enough: it now reserves its rows
    late = _req(3, conds, GenerationParams.greedy(max_mel_tokens=30), results)
    sched.submit(late)
    sched.iterate()
    assert "s3" not in {lv.req.seq_id for lv in sched._live}
    while len(results) < 4:
        sched.iterate()
    assert all(not r.error for r in results.values())


@pytest.mark.parametrize("params", [GenerationParams.greedy(max_mel_tokens=80),
                                    GenerationParams(do_sample=True, num_beams=1, max_mel_tokens=80)])
def test_streamed_partials_concatenate_to_the_whole_result(decoder, conds, params):
    """Chunked streaming: partial results (cleaned codes + incremental latents) add up to the one-shot result."""
    from model_repository.decoder_core import SequenceRequest

    whole: dict = {}
    run_to_completion(DecoderScheduler(decoder, max_sequences=4), [_req(i, conds, params, whole, seed=3)
                                                                   for i in range(3)])
    parts: dict = {i: [] for i in range(3)}
    final: dict = {}
    reqs = [SequenceRequest(f"s{i}", conds.numpy()[0], TEXTS[i], params, 3,
                            on_done=lambda r: final.__setitem__(r.seq_id, r), stream_at=[4, 9, 20, 40],
                            on_partial=lambda p, i=i: parts[i].append(p)) for i in range(3)]
    run_to_completion(DecoderScheduler(decoder, max_sequences=4), reqs)
    for i in range(3):
        ref, done = whole[f"s{i}"], final[f"s{i}"]
        offsets = [p.offset for p in parts[i]] + [done.offset]
        codes = [c for p in parts[i] for c in p.codes] + done.codes
        assert codes == ref.codes and done.stopped == ref.stopped
        assert offsets == sorted(offsets) and all(p.offset + len(p.codes) == q for p, q in zip(parts[i], offsets[1:]))
        assert [len(p.codes) + p.offset for p in parts[i]] == [t for t in (4, 9, 20, 40) if t < len(ref.codes) + 1][:len(parts[i])]
        lat = np.concatenate([p.latents for p in parts[i]] + ([done.latents] if done.codes else []))
        np.testing.assert_allclose(lat, ref.latents, rtol=1e-4, atol=1e-5)


def test_first_segments_are_admitted_before_other_requests_look_ahead(decoder, conds):
    """A new request's first segment (its time to first audio) is not queued behind segments 1..n of others."""
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=2)
    ahead = [_req(i, conds, GenerationParams.greedy(max_mel_tokens=10), results) for i in range(3)]
    for i, r in enumerate(ahead):
        r.priority = i + 1  # later segments of some request
    first = _req(4, conds, GenerationParams.greedy(max_mel_tokens=10), results)
    for r in (*ahead, first):
        sched.submit(r)
    sched.iterate()
    assert {lv.req.seq_id for lv in sched._live} == {"s4", "s0"}


def test_a_late_cancel_is_forgotten_after_its_memory(decoder, conds):
    results: dict = {}
    now = [0.0]
    sched = DecoderScheduler(decoder, max_sequences=2, clock=lambda: now[0])
    run_to_completion(sched, [_req(0, conds, GenerationParams.greedy(max_mel_tokens=5), results)])
    sched.cancel("s0")  # already finished
    run_to_completion(sched, [_req(1, conds, GenerationParams.greedy(max_mel_tokens=5), results)])
    assert "s0" in sched._cancelled and not results["s1"].cancelled
    now[0] += CANCEL_MEMORY_S + 1
    run_to_completion(sched, [_req(2, conds, GenerationParams.greedy(max_mel_tokens=5), results)])
    assert not sched._cancelled


def test_a_cancel_that_arrives_before_its_sequence_stops_it(decoder, conds):
    """The BLS's cancel and its decode call travel separately; the decode may arrive second."""
    results: dict = {}
    sched = DecoderScheduler(decoder, max_sequences=2)
    sched.cancel("s0")
    sched.iterate()  # an iteration with nothing held must not forget it
    run_to_completion(sched, [_req(0, conds, GenerationParams.greedy(max_mel_tokens=30), results),
                              _req(1, conds, GenerationParams.greedy(max_mel_tokens=5), results)])
    assert results["s0"].cancelled and not results["s0"].codes and not results["s1"].cancelled
    assert not sched._cancelled
