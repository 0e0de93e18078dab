"""The real tritonserver over a built repository (tiny preset): streaming, offline, batching, cancellation, caching,
metrics, and bad input that never disturbs a concurrent good request."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from engine_ref.sampling import GenerationParams
from engine_ref.indextts.synthesizer import Synthesizer
from model_repository import contract as c
from perf.loadgen import scrape_metrics

TEXT = "Hello world. This is a test of the tiny model, with numbers like 42! Does it work? Yes, it does."
TEXTS = [
    "One short line.", "Two words here, and a few more.", "Numbers: 1, 2 and 3.", "What about a question?",
    "Another sentence for the batch.", "Seven is a lucky number!", "Tiny models speak quickly.", "The last one, eight.",
]
MAX_CHARS = 2000  # tests/conftest.py TINY_SERVER_MAX_TEXT_CHARS


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's shared tiny server (tests/conftest.py: max_sequences 8, max_text_chars MAX_CHARS)."""
    return tiny_server


@pytest.fixture(scope="module")
def reference_audio(voice_wav) -> bytes:
    return voice_wav.read_bytes()


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Synthesizer:
    return Synthesizer.from_pretrained(tiny_model_dir)


@dataclass
class Reply:
    chunks: list[np.ndarray] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    last_flags: list[bool] = field(default_factory=list)
    sample_offsets: list[int] = field(default_factory=list)
    speaker: str | None = None
    error: str | None = None
    first_audio_s: float | None = None

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def _inputs(module, text: str | None, audio: bytes | None, **params) -> list:
    def mk(field: c.Field, arr: np.ndarray):
        t = module.InferInput(field.name, list(arr.shape), field.client_type)
        t.set_data_from_numpy(arr)
        return t

    out = []
    if text is not None:
        out.append(mk(c.TEXT, np.array([text.encode()], dtype=np.object_)))
    if audio is not None:
        out.append(mk(c.REFERENCE_AUDIO, np.array([audio], dtype=np.object_)))
    np_types = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}
    for key, value in params.items():
        field = {"speaker_id": c.SPEAKER_ID, "stream": c.STREAM,
                 "max_text_tokens_per_segment": c.MAX_TEXT_TOKENS_PER_SEGMENT,
                 "chunk_first_codes": c.CHUNK_FIRST_CODES, "chunk_max_codes": c.CHUNK_MAX_CODES}.get(key) \
            or c.PARAMS[key]
        arr = (np.array([value.encode()], dtype=np.object_) if field.client_type == "BYTES"
               else np.array([value], dtype=np_types[field.client_type]))
        out.append(mk(field, arr))
    return out


GREEDY = {"do_sample": False, "num_beams": 1}


def stream(server, text, audio, model=c.STREAM_MODEL, cancel_after: int | None = None, raw_inputs=None,
           **params) -> Reply:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    reply = Reply()
    t0 = time.perf_counter()
    client.async_stream_infer(model, raw_inputs or _inputs(grpcclient, text, audio, **params),
                              enable_empty_final_response=True)
    try:
        while True:
            result, error = q.get(timeout=180)
            if error is not None:
                reply.error = str(error)
                break
            final = result.get_response().parameters["triton_final_response"].bool_param
            audio_out = result.as_numpy(c.AUDIO.name)
            if audio_out is not None:
                if reply.first_audio_s is None and audio_out.size:
                    reply.first_audio_s = time.perf_counter() - t0
                reply.chunks.append(audio_out)
                reply.infos.append(json.loads(result.as_numpy(c.INFO.name)[0]))
                reply.indices.append(int(result.as_numpy(c.SEGMENT_INDEX.name)[0]))
                reply.last_flags.append(bool(result.as_numpy(c.IS_LAST.name)[0]))
                reply.sample_offsets.append(int(result.as_numpy(c.SAMPLE_OFFSET.name)[0]))
                reply.speaker = result.as_numpy(c.SPEAKER_ID_OUT.name)[0].decode()
                if cancel_after is not None and len(reply.chunks) >= cancel_after:
                    client.stop_stream(cancel_requests=True)
                    return reply
            if final:
                break
    finally:
        try:
            client.stop_stream()
        except Exception:
            pass
    return reply


def metrics(server) -> dict[str, float]:
    """The server's tts_* metrics summed over their labels (the benches' scraper, one home for the format)."""
    return scrape_metrics(server.metrics_url, timeout_s=10)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()) <= 2


def test_streaming_equals_engine_ref_greedy(server, reference_audio, engine, voice_wav):
    # One chunk per segment here (chunked streaming has its own tests, tests/test_streaming_chunks.py).
    reply = stream(server, TEXT, reference_audio, max_text_tokens_per_segment=16, chunk_first_codes=0, **GREEDY)
    assert reply.error is None
    n = len(reply.chunks)
    assert n >= 3 and reply.indices == list(range(n)) and reply.last_flags == [False] * (n - 1) + [True]
    assert reply.infos[-1]["timings"]["ttfa_s"] > 0
    ref = engine.synthesize(TEXT, voice_wav, GenerationParams.greedy(), max_text_tokens_per_segment=16)
    assert [i["codes"] for i in reply.infos] == [len(s.codes) for s in ref.segments]
    _close(reply.audio, ref.pcm16)


def test_offline_http_and_grpc_non_streaming_give_the_same_audio(server, reference_audio):
    streamed = stream(server, TEXT, reference_audio, max_text_tokens_per_segment=16, **GREEDY)
    single = stream(server, TEXT, reference_audio, max_text_tokens_per_segment=16, stream=False, **GREEDY)
    assert len(single.chunks) == 1 and single.indices == [-1]
    _close(single.audio, streamed.audio)
    http = httpclient.InferenceServerClient(server.http_url)
    res = http.infer(c.OFFLINE_MODEL, _inputs(httpclient, TEXT, reference_audio, max_text_tokens_per_segment=16,
                                                 **GREEDY))
    _close(res.as_numpy(c.AUDIO.name), streamed.audio)
    assert int(res.as_numpy(c.SAMPLE_RATE.name)[0]) == 24000


def test_eight_concurrent_requests_each_equal_their_solo_result(server, reference_audio):
    solo = [stream(server, t, reference_audio, **GREEDY).audio for t in TEXTS]
    results: list[Reply | None] = [None] * len(TEXTS)

    def go(i):
        results[i] = stream(server, TEXTS[i], reference_audio, **GREEDY)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert r is not None and r.error is None
        _close(r.audio, solo[i])


def test_request_joining_mid_generation(server, reference_audio):
    long_text = "This request is long. " * 6
    solo_long = stream(server, long_text, reference_audio, max_text_tokens_per_segment=12, **GREEDY).audio
    solo_short = stream(server, TEXTS[0], reference_audio, **GREEDY).audio
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("long", stream(server, long_text, reference_audio,
                                                                      max_text_tokens_per_segment=12, **GREEDY)))
    t.start()
    time.sleep(0.4)  # the long one is mid-generation
    short = stream(server, TEXTS[0], reference_audio, **GREEDY)
    t.join()
    _close(short.audio, solo_short)
    _close(box["long"].audio, solo_long)


def test_cancellation_frees_the_sequence(server, reference_audio):
    before = metrics(server)
    reply = stream(server, "A long text that keeps going. " * 10, reference_audio, model=c.STREAM_MODEL, cancel_after=1,
                   max_text_tokens_per_segment=12, max_mel_tokens=300, **GREEDY)
    assert reply.error is None and len(reply.chunks) == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = metrics(server)
        if m.get("tts_requests_cancelled_total", 0) > before.get("tts_requests_cancelled_total", 0) and \
                m.get("tts_decoder_active_sequences", 1) == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the cancelled request was not cleaned up: {metrics(server)}")


def test_speaker_cache_hit_skips_the_encoder_and_speaker_id_reuse(server, reference_audio):
    first = stream(server, "Cache test.", reference_audio, **GREEDY)
    before = metrics(server)
    again = stream(server, "Cache test.", reference_audio, **GREEDY)
    after = metrics(server)
    assert after["tts_speaker_cache_hits_total"] == before["tts_speaker_cache_hits_total"] + 1
    assert after.get("tts_speaker_cache_misses_total", 0) == before.get("tts_speaker_cache_misses_total", 0)
    by_id = stream(server, "Cache test.", None, speaker_id=first.speaker, **GREEDY)
    _close(by_id.audio, again.audio)
    unknown = stream(server, "Cache test.", None, speaker_id="nope")
    assert "not in this server's cache" in unknown.error


@pytest.fixture(scope="module")
def good_solo(server, reference_audio) -> np.ndarray:
    return stream(server, TEXT, reference_audio, max_text_tokens_per_segment=16, **GREEDY).audio


@pytest.mark.parametrize(
    "case,needle,fast",
    [
        ("empty_text", "empty", False),
        ("long_text", str(MAX_CHARS), False),
        ("bad_audio", "audio", False),
        ("no_audio", "REFERENCE_AUDIO", True),
        ("top_p", "top_p", True),
        ("max_mel_tokens", "max_mel_tokens", True),
        ("tiny_temperature", "temperature", True),  # 1e-38 with sampling: once a NaN that failed every request
        ("num_beams", "num_beams", True),
        ("nan_penalty", "repetition_penalty", True),
        ("wrong_dtype", "TEMPERATURE", True),
        ("wrong_shape", "TOP_K", True),
        ("no_text", "TEXT", True),
        ("internal_input", "SEGMENT_IDS", True),  # the internal segment route is not an input of `tts`
    ],
)
def test_bad_input_is_refused_while_a_good_request_completes(server, reference_audio, good_solo, case, needle, fast):
    """Each bad request gets INVALID_ARGUMENT naming the problem, quickly, while a concurrent greedy request
    returns exactly the audio it returns alone."""
    good: dict = {}
    t = threading.Thread(target=lambda: good.setdefault("r", stream(server, TEXT, reference_audio,
                                                                    max_text_tokens_per_segment=16, **GREEDY)))
    t.start()
    time.sleep(0.2)  # the good request is decoding
    kwargs: dict = {"text": TEXT, "audio": reference_audio}
    if case == "empty_text":
        kwargs["text"] = "  "
    elif case == "long_text":
        kwargs["text"] = "word " * (MAX_CHARS // 4)
    elif case == "bad_audio":
        kwargs["audio"] = b"this is not audio at all" * 10
    elif case == "no_audio":
        kwargs["audio"] = None
    elif case == "top_p":
        kwargs["top_p"] = 2.0
    elif case == "max_mel_tokens":
        kwargs["max_mel_tokens"] = 100_000
    elif case == "tiny_temperature":
        kwargs.update(temperature=1e-38, do_sample=True, num_beams=1)
    elif case == "num_beams":
        kwargs["num_beams"] = 100
    elif case == "nan_penalty":
        kwargs["repetition_penalty"] = float("nan")
    elif case in ("wrong_dtype", "wrong_shape", "no_text", "internal_input"):
        base = _inputs(grpcclient, None if case == "no_text" else TEXT, reference_audio)
        name, dtype, value = {"wrong_dtype": ("TEMPERATURE", "INT32", np.array([1], np.int32)),
                              "wrong_shape": ("TOP_K", "INT32", np.array([1, 2, 3], np.int32)),
                              "no_text": ("TOP_K", "INT32", np.array([5], np.int32)),
                              "internal_input": ("SEGMENT_IDS", "INT64", np.array([5, 6, 7], np.int64))}[case]
        bad = grpcclient.InferInput(name, list(value.shape), dtype)
        bad.set_data_from_numpy(value)
        kwargs["raw_inputs"] = base + [bad]
    t0 = time.perf_counter()
    reply = stream(server, kwargs.pop("text"), kwargs.pop("audio"), **kwargs)
    took = time.perf_counter() - t0
    t.join()
    assert reply.error is not None and needle.lower() in reply.error.lower(), reply.error
    # A gRPC stream carries only an error message; the unary route carries the status a client can act on.
    unary = grpcclient.InferenceServerClient(server.grpc_url)
    raw = kwargs.get("raw_inputs") or _inputs(grpcclient, *(_case_text_audio(case, reference_audio)),
                                              **{k: v for k, v in kwargs.items() if k != "raw_inputs"})
    with pytest.raises(InferenceServerException) as refused:
        unary.infer(c.OFFLINE_MODEL, raw, client_timeout=60)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", (refused.value.status(), str(refused.value))
    assert needle.lower() in str(refused.value).lower()
    if fast:  # checked before any work, while another request keeps the CPU busy (the target is 100 ms)
        assert took < 0.5, took
    assert good["r"].error is None and good["r"].last_flags[-1]
    # Same codes as alone; the batch it shared changes fp32 rounding of its latents by at most an LSB or two.
    _close(good["r"].audio, good_solo)


def _case_text_audio(case: str, audio: bytes) -> tuple:
    return {"empty_text": ("  ", audio), "long_text": ("word " * (MAX_CHARS // 4), audio),
            "bad_audio": (TEXT, b"this is not audio at all" * 10), "no_audio": (TEXT, None)}.get(case, (TEXT, audio))


def test_invalid_utf8_is_replaced_and_reported(server, reference_audio):
    raw = "Caf\u00e9 time.".encode() + b"\xff\xfe bytes."
    inputs = _inputs(grpcclient, None, reference_audio, **GREEDY)
    text = grpcclient.InferInput(c.TEXT.name, [1], "BYTES")
    text.set_data_from_numpy(np.array([raw], dtype=np.object_))
    reply = stream(server, None, None, raw_inputs=[text, *inputs])
    assert reply.error is None
    assert any("not valid UTF-8" in w for w in reply.infos[-1]["all_warnings"]), reply.infos[-1]


def test_internal_models_and_admin_apis_are_closed_to_clients(server, reference_audio):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    seq = grpcclient.InferInput(c.SEQUENCE_ID.name, [1], "BYTES")
    seq.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    cancel = grpcclient.InferInput(c.CANCEL.name, [1], "BOOL")
    cancel.set_data_from_numpy(np.array([True]))
    for model, inputs in ((c.PREPROCESS, _inputs(grpcclient, TEXT, None)), (c.DECODER, [seq, cancel])):
        q: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(model, inputs) if model == c.DECODER else None
        if model == c.DECODER:
            result, error = q.get(timeout=30)
            client.stop_stream()
        else:
            client.stop_stream()
            with pytest.raises(Exception, match="internal"):
                client.infer(model, inputs)
            continue
        assert error is not None and "internal" in str(error), (result, error)
    # Logging and repository control need the admin key; the key works.
    http = f"http://{server.http_url}"
    body = json.dumps({"log_error": False}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{http}/v2/logging", data=body, method="POST"), timeout=10)
    assert refused.value.code in (401, 403)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(f"{http}/v2/repository/models/{c.VOCODER}/unload", data=b"{}",
                                                      method="POST"), timeout=10)
    ok = urllib.request.urlopen(urllib.request.Request(f"{http}/v2/logging", method="GET",
                                                       headers=server.admin_headers), timeout=10)
    assert ok.status == 200 and json.loads(ok.read())["log_error"] is True


FOUR_STREAMS = {"max_mel_tokens": 120, "max_text_tokens_per_segment": 12, "chunk_first_codes": 0, **GREEDY}


def test_four_streams_decode_together_and_each_equals_its_solo_result(server, reference_audio):
    # Two segments each, sent to the decoder together (one chunk per segment: with chunks a request's next segment
    # starts only when the previous one left the decoder, and tiny's segments end within a few steps of the
    # requests' arrival gaps), so every request keeps a sequence in the decoder for most of its life.
    texts = ["A first sentence that takes a while to say. It goes on a little.",
             "The second one is here, also fairly long. It has a tail too.",
             "Third: numbers like twenty and thirty. Then forty.", "And the fourth, which closes the set. The end."]
    solo, solo_s = [], []
    steps0 = metrics(server).get("tts_decoder_steps_total", 0)
    for t in texts:
        t0 = time.perf_counter()
        solo.append(stream(server, t, reference_audio, **FOUR_STREAMS).audio)
        solo_s.append(time.perf_counter() - t0)
    solo_steps = metrics(server).get("tts_decoder_steps_total", 0) - steps0
    peak = {"active": 0.0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            # the decoder's peak over its last second of steps: a 5 ms scrape of the instant gauge missed short peaks
            peak["active"] = max(peak["active"], metrics(server).get("tts_decoder_step_sequences_peak", 0))
            time.sleep(0.05)

    results: list[Reply | None] = [None] * 4
    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(
        server, texts[i], reference_audio, **FOUR_STREAMS))) for i in range(4)]
    steps1 = metrics(server).get("tts_decoder_steps_total", 0)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    together_steps = metrics(server).get("tts_decoder_steps_total", 0) - steps1
    for r, ref in zip(results, solo):
        assert r is not None and r.error is None
        _close(r.audio, ref)
    assert peak["active"] >= 4, peak
    # One batched step serves every live sequence: far fewer steps than the four one after another. (Wall time is
    # not asserted: on 2 cores tiny's requests are mostly preprocess and vocoder work that already uses both cores
    # alone, so together vs one after another is within noise; CI saw 2.30 s vs 2.29 s. The step count cannot pass
    # unless the sequences shared decoder steps.)
    assert together_steps < 0.6 * solo_steps, (together_steps, solo_steps)
    print(f"four streams: {wall:.2f} s together vs {sum(solo_s):.2f} s one after another")


def test_cancel_under_load_frees_the_sequence_within_a_second(server, reference_audio):
    long_text = "A long text that keeps going and going. " * 8
    load = [threading.Thread(target=stream, args=(server, TEXTS[i], reference_audio), kwargs=GREEDY)
            for i in range(3)]
    for t in load:
        t.start()
    m0 = metrics(server)
    before = m0.get("tts_decoder_sequences_cancelled_total", 0)
    closed_before = m0.get("tts_requests_cancelled_total", 0)
    # One chunk per segment: the first arrives when segment 0 is done and the next segments are in the decoder
    # (with chunks, tiny's short segment 0 may end between its first chunk and the cancel, leaving nothing to free).
    reply = stream(server, long_text, reference_audio, cancel_after=1, max_text_tokens_per_segment=12,
                   max_mel_tokens=300, chunk_first_codes=0, **GREEDY)
    cancelled_at = time.perf_counter()
    assert reply.error is None and len(reply.chunks) == 1
    while time.perf_counter() - cancelled_at < 5:
        m = metrics(server)
        closed = m.get("tts_requests_cancelled_total", 0) > closed_before
        if closed and m.get("tts_decoder_sequences_cancelled_total", 0) > before:
            break  # the decoder dropped a live sequence of the cancelled request
        if closed and not any(t.is_alive() for t in load) and m.get("tts_decoder_active_sequences", 1) == 0:
            break  # its in-flight segments had all ended already: nothing of it is left in the decoder
        time.sleep(0.01)
    freed = time.perf_counter() - cancelled_at
    for t in load:
        t.join()
    assert freed < 1.0, freed
    m = metrics(server)  # the decoder's step-time percentiles are published with its other metrics
    assert 0 < m["tts_decoder_step_seconds_p50"] <= m["tts_decoder_step_seconds_p99"] < 5, m


def test_a_large_beam_request_does_not_hold_up_a_short_one(server, reference_audio):
    short_solo = time.perf_counter()
    stream(server, TEXTS[0], reference_audio, **GREEDY)
    short_solo = time.perf_counter() - short_solo
    box: dict = {}
    beams = threading.Thread(target=lambda: box.setdefault("beams", stream(
        server, "A long request searched with many beams, sentence after sentence. " * 3, reference_audio,
        num_beams=16, do_sample=False, max_mel_tokens=200)))
    beams.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    short = stream(server, TEXTS[0], reference_audio, **GREEDY)
    short_s = time.perf_counter() - t0
    short_done = time.perf_counter()
    beams.join()
    assert short.error is None and box["beams"].error is None
    assert short_s < max(4 * short_solo, 1.0), (short_s, short_solo)
    assert short_done < time.perf_counter()


def test_metrics_are_exported(server, reference_audio):
    stream(server, TEXTS[1], reference_audio, **GREEDY)
    m = metrics(server)
    for name in ("tts_audio_seconds_total", "tts_generated_tokens_total", "tts_decoder_active_sequences",
                 "tts_decoder_queued_sequences", "tts_speaker_cache_hit_ratio", "tts_time_to_first_audio_seconds",
                 "tts_decoder_tokens_per_second", "tts_requests_completed_total"):
        assert name in m, name
    assert m["tts_audio_seconds_total"] > 0 and m["tts_generated_tokens_total"] > 0


def test_many_concurrent_requests_keep_the_server_alive(server, reference_audio):
    """Regression: unserialized messaging from the Python models' worker threads crashed Triton 2.51 (SIGSEGV).
    64 streams at once, every one answered in full, and the server still up."""
    results: list[Reply | None] = [None] * 64

    def go(i):
        results[i] = stream(server, TEXTS[i % len(TEXTS)], reference_audio, model=c.STREAM_MODEL, **GREEDY)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.process.poll() is None
    assert all(r is not None and r.error is None and r.last_flags[-1] for r in results)
