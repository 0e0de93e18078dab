"""Chunked streaming on the real server (tiny preset): first audio after a few codes, and the chunks of a segment
add up to the audio of the same request without streaming (int16 within 2 LSB)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from export.manifest import read_manifest
from model_repository import contract as c
from tests.test_serving import GREEDY, Reply, _close, stream

TEXT = "Chunked streaming sends audio early. Every chunk must line up with the whole segment, sample for sample."
SAMPLED = {"do_sample": True, "num_beams": 1, "seed": 1234}


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's shared tiny server (tests/conftest.py)."""
    return tiny_server


@pytest.fixture(scope="module")
def context(tiny_export_dir) -> tuple[int, int]:
    ctx = read_manifest(tiny_export_dir).component("vocoder").extra["stream_context_frames"]
    return ctx["left"], ctx["right"]


@pytest.fixture(scope="module")
def audio(voice_wav) -> bytes:
    return voice_wav.read_bytes()


def chunked(server, audio, first: int, most: int, **params) -> Reply:
    return stream(server, TEXT, audio, chunk_first_codes=first, chunk_max_codes=most, max_mel_tokens=200,
                  max_text_tokens_per_segment=16, **params)


def whole(server, audio, **params) -> Reply:
    return stream(server, TEXT, audio, stream=False, max_mel_tokens=200, max_text_tokens_per_segment=16, **params)


@pytest.mark.parametrize("mode", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("first,most", [(4, 8), (16, 64), (1, 2)])
def test_chunks_add_up_to_the_unstreamed_audio(server, audio, context, mode, first, most):
    ref = whole(server, audio, **mode)
    got = chunked(server, audio, first, most, **mode)
    assert got.error is None and ref.error is None
    _close(got.audio, ref.audio)
    infos = got.infos
    per_segment: dict[int, list[dict]] = {}
    for info in infos:
        per_segment.setdefault(info["segment"], []).append(info)
    assert len(per_segment) == len(ref.infos[-1]["segments"]) >= 2
    for seg, chunks in per_segment.items():
        total = chunks[-1]["segment_codes"]
        assert [ch["chunk"] for ch in chunks] == list(range(len(chunks)))
        assert chunks[0]["code_range"][0] == 0 and chunks[-1]["code_range"][1] == total
        if total > first + context[1]:
            # The first chunk covers `first` codes and went out once its look-ahead had been generated.
            assert chunks[0]["code_range"] == [0, first] and chunks[0]["codes_available"] >= first + context[1]
            assert chunks[0]["codes_available"] < total or not chunks[-1]["stopped"]
            assert len(chunks) >= 2
    offsets = [int(x) for x in got.sample_offsets]
    assert offsets == list(np.cumsum([0] + [ch.size for ch in got.chunks])[:-1])


def test_per_segment_streaming_is_still_available(server, audio):
    got = stream(server, TEXT, audio, chunk_first_codes=0, max_mel_tokens=200, max_text_tokens_per_segment=16,
                 **GREEDY)
    ref = whole(server, audio, **GREEDY)
    assert len(got.chunks) == len(ref.infos[-1]["segments"])
    _close(got.audio, ref.audio)


def test_chunks_of_eight_concurrent_requests_equal_each_alone(server, audio):
    texts = [f"Request number {i} streams in chunks. It has two sentences." for i in range(8)]
    solo = [stream(server, t, audio, stream=False, max_mel_tokens=150, **GREEDY).audio for t in texts]
    results: list[Reply | None] = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(
        server, texts[i], audio, chunk_first_codes=8, chunk_max_codes=32, max_mel_tokens=150, **GREEDY)))
        for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, ref in zip(results, solo):
        assert r is not None and r.error is None
        assert len(r.chunks) > 2
        _close(r.audio, ref)


def test_cancel_mid_chunk_frees_the_sequence(server, audio):
    """Cancelled between two chunks of segment 0: the request ends and nothing of it stays in the decoder
    (segments already decoding are cancelled there; the rest never start)."""
    from tests.test_serving import metrics

    before = metrics(server)
    reply = stream(server, "A long text that keeps going. " * 10, audio, chunk_first_codes=4, chunk_max_codes=4,
                   max_mel_tokens=300, cancel_after=2, max_text_tokens_per_segment=12, **GREEDY)
    t0 = time.perf_counter()
    assert reply.error is None and len(reply.chunks) == 2 and reply.infos[1]["chunk"] == 1
    while time.perf_counter() - t0 < 5:
        m = metrics(server)
        if m.get("tts_requests_cancelled_total", 0) > before.get("tts_requests_cancelled_total", 0) and \
                m.get("tts_decoder_active_sequences", 1) == 0:
            break
        time.sleep(0.01)
    assert time.perf_counter() - t0 < 1.0
    # Nothing of the request was decoded to its end after the cancel: 10 segments, far fewer finished.
    m = metrics(server)
    assert m["tts_generated_tokens_total"] - before["tts_generated_tokens_total"] < 6 * 41


def test_bad_chunk_settings_are_refused(server, audio):
    reply = stream(server, TEXT, audio, chunk_first_codes=-3, **GREEDY)
    assert reply.error and "CHUNK_FIRST_CODES" in reply.error
