"""The real tritonserver over a built repository (tiny preset): streaming, offline, batching, cancellation, caching,
metrics, and bad input that never disturbs a concurrent good request."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from engine_ref.sampling import GenerationParams
from engine_ref.synthesizer import Synthesizer
from model_repository import contract as c
from model_repository.builder import RepoOptions, build_repository
from model_repository.server import ServerConfig, TritonServer, free_port

TEXT = "Hello world. This is a test of the tiny model, with numbers like 42! Does it work? Yes, it does."
TEXTS = [
    "One short line.", "Two words here, and a few more.", "Numbers: 1, 2 and 3.", "What about a question?",
    "Another sentence for the batch.", "Seven is a lucky number!", "Tiny models speak quickly.", "The last one, eight.",
]
MAX_CHARS = 2000


@pytest.fixture(scope="module")
def server(tiny_export_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serving")
    repo = build_repository(tiny_export_dir, work / "repo", RepoOptions(max_sequences=8, max_text_chars=MAX_CHARS))
    srv = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    srv.start(timeout_s=240)
    yield srv
    srv.stop()


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
                 "max_text_tokens_per_segment": c.MAX_TEXT_TOKENS_PER_SEGMENT}.get(key) or c.PARAMS[key]
        arr = (np.array([value.encode()], dtype=np.object_) if field.client_type == "BYTES"
               else np.array([value], dtype=np_types[field.client_type]))
        out.append(mk(field, arr))
    return out


GREEDY = {"do_sample": False, "num_beams": 1}


def stream(server, text, audio, model=c.ENSEMBLE_STREAM, cancel_after: int | None = None, raw_inputs=None,
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
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(tts_[a-z_]+)\{[^}]*\} ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()) <= 2


def test_streaming_equals_engine_ref_greedy(server, reference_audio, engine, voice_wav):
    reply = stream(server, TEXT, reference_audio, max_text_tokens_per_segment=16, **GREEDY)
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
    res = http.infer(c.ENSEMBLE_OFFLINE, _inputs(httpclient, TEXT, reference_audio, max_text_tokens_per_segment=16,
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
    reply = stream(server, "A long text that keeps going. " * 10, reference_audio, model=c.BLS_STREAM, cancel_after=1,
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


@pytest.mark.parametrize(
    "case,needle",
    [
        ("empty_text", "empty"),
        ("long_text", str(MAX_CHARS)),
        ("bad_audio", "audio"),
        ("no_audio", "REFERENCE_AUDIO"),
        ("top_p", "top_p"),
        ("max_mel_tokens", "max_mel_tokens"),
        ("wrong_dtype", "TEMPERATURE"),
        ("wrong_shape", "TOP_K"),
    ],
)
def test_bad_input_is_refused_while_a_good_request_completes(server, reference_audio, case, needle):
    good: dict = {}
    t = threading.Thread(target=lambda: good.setdefault("r", stream(server, TEXT, reference_audio,
                                                                    max_text_tokens_per_segment=16, **GREEDY)))
    t.start()
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
    elif case == "wrong_dtype":
        bad = grpcclient.InferInput("TEMPERATURE", [1], "INT32")
        bad.set_data_from_numpy(np.array([1], np.int32))
        kwargs["raw_inputs"] = _inputs(grpcclient, TEXT, reference_audio) + [bad]
    elif case == "wrong_shape":
        bad = grpcclient.InferInput("TOP_K", [3], "INT32")
        bad.set_data_from_numpy(np.array([1, 2, 3], np.int32))
        kwargs["raw_inputs"] = _inputs(grpcclient, TEXT, reference_audio) + [bad]
    reply = stream(server, kwargs.pop("text"), kwargs.pop("audio"), **kwargs)
    t.join()
    assert reply.error is not None and needle.lower() in reply.error.lower(), reply.error
    assert good["r"].error is None and good["r"].last_flags[-1]


def test_metrics_are_exported(server, reference_audio):
    stream(server, TEXTS[1], reference_audio, **GREEDY)
    m = metrics(server)
    for name in ("tts_audio_seconds_total", "tts_generated_tokens_total", "tts_decoder_active_sequences",
                 "tts_decoder_queued_sequences", "tts_speaker_cache_hit_ratio", "tts_time_to_first_audio_seconds",
                 "tts_decoder_tokens_per_second", "tts_requests_completed_total"):
        assert name in m, name
    assert m["tts_audio_seconds_total"] > 0 and m["tts_generated_tokens_total"] > 0


def test_many_concurrent_requests_keep_the_server_alive(server, reference_audio):
    """Regression: unserialized messaging from the Python models' worker threads crashed Triton 2.51 (SIGSEGV)."""
    results: list[Reply | None] = [None] * 32

    def go(i):
        results[i] = stream(server, TEXTS[i % len(TEXTS)], reference_audio, model=c.BLS_STREAM, **GREEDY)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.process.poll() is None
    assert all(r is not None and r.error is None and r.last_flags[-1] for r in results)
