"""Continuous batching over the exported decoder: every request gets exactly what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_ref.beam_search import decode_beams
from engine_ref.generate import decode_sampling, latent_pass, remove_long_silence
from engine_ref.loader import load_model
from engine_ref.sampling import GenerationParams
from export.runtime import OrtDecoder
from model_repository.decoder_core import DecoderScheduler, QueueFull, SequenceRequest, run_to_completion

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
