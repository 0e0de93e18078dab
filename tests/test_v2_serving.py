"""IndexTTS-2 served end to end (tiny-v2): the real tritonserver over the built repository vs engine_ref's Synthesizer2.

Served audio == Synthesizer2 (greedy and seeded sampling, int16 within 2 LSB, 22.05 kHz, interval silence as upstream
joins segments); concurrent requests each equal their solo result while `s2mel` batches their diffusion steps
(one joining mid-diffusion); emotion controls == engine_ref; cancellation mid-diffusion frees the rows; bad
IndexTTS-2 inputs get INVALID_ARGUMENT naming the input while a concurrent good request completes.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from engine_ref.audio import write_wav
from engine_ref.finishing import interval_samples
from engine_ref.indextts.presets import demo_voice
from engine_ref.indextts2.gpt import v2_generation_params
from engine_ref.indextts2.loader import load_v2_model
from engine_ref.indextts2.synthesizer import EmotionOptions, Synthesizer2
from model_repository import contract as c
from model_repository.builder import RepoOptions, build_repository
from model_repository.server import ServerConfig, TritonServer, free_port
from perf.loadgen import scrape_metrics

TEXT = "Hello world. This is a test."
SEG = 16  # MAX_TEXT_TOKENS_PER_SEGMENT: two segments for TEXT
GREEDY = {"do_sample": False, "num_beams": 1, "seed": 11}
SAMPLED = {"do_sample": True, "num_beams": 1, "seed": 7}
QWEN_TOKENS = 24  # the tiny random Qwen emotion model never stops by itself (upstream: 32768)
VECTOR = (0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0)
_FIELDS = {f.name.lower(): f for f in c.REQUEST_INPUTS}
_FIELDS.update({k: f for k, f in c.PARAMS.items()})
_NP = {"FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_v2_export_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("serving-v2")
    opts = RepoOptions(max_sequences=8, s2mel_max_rows=16, qwen_max_new_tokens=QWEN_TOKENS)
    repo = build_repository(tiny_v2_export_dir, work / "repo", opts)
    srv = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    srv.start(timeout_s=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(tiny_v2_model_dir):
    return load_v2_model(tiny_v2_model_dir)


@pytest.fixture(scope="module")
def engine(model) -> Synthesizer2:
    return Synthesizer2(model, max_reference_seconds=15.0, qwen_max_new_tokens=QWEN_TOKENS)  # the repository's settings


@pytest.fixture(scope="module")
def voice(v2_voice_wav) -> bytes:
    return v2_voice_wav.read_bytes()


@pytest.fixture(scope="module")
def emotion_wav(tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("emo") / "emo.wav", demo_voice(1.2, 16000, seed=5), 16000)


@dataclass
class Reply:
    chunks: list[np.ndarray] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    last_flags: list[bool] = field(default_factory=list)
    rates: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def _inputs(text: str | None, audio: bytes | None, **params) -> list:
    def mk(f: c.Field, arr: np.ndarray):
        t = grpcclient.InferInput(f.name, list(arr.shape), f.client_type)
        t.set_data_from_numpy(arr)
        return t

    out = []
    if text is not None:
        out.append(mk(c.TEXT, np.array([text.encode()], dtype=np.object_)))
    if audio is not None:
        out.append(mk(c.REFERENCE_AUDIO, np.array([audio], dtype=np.object_)))
    for key, value in params.items():
        f = _FIELDS[key]
        if f.client_type == "BYTES":
            arr = np.array([value if isinstance(value, bytes) else value.encode()], dtype=np.object_)
        else:
            arr = np.asarray(value if np.ndim(value) else [value], dtype=_NP[f.client_type])
        out.append(mk(f, arr))
    return out


def stream(server, text, audio, *, cancel_when=None, raw_inputs=None, **params) -> Reply:
    """One streaming request; `cancel_when()` (polled while waiting) cancels it from the client side."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    reply = Reply()
    client.async_stream_infer(c.STREAM_MODEL, raw_inputs or _inputs(text, audio, **params),
                              enable_empty_final_response=True)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if cancel_when is not None and cancel_when():
                client.stop_stream(cancel_requests=True)
                reply.error = "cancelled by the test"
                return reply
            try:
                result, error = q.get(timeout=0.005 if cancel_when is not None else 5)
            except queue.Empty:
                continue
            if error is not None:
                reply.error = str(error)
                break
            audio_out = result.as_numpy(c.AUDIO.name)
            if audio_out is not None:
                reply.chunks.append(audio_out)
                reply.infos.append(json.loads(result.as_numpy(c.INFO.name)[0]))
                reply.indices.append(int(result.as_numpy(c.SEGMENT_INDEX.name)[0]))
                reply.last_flags.append(bool(result.as_numpy(c.IS_LAST.name)[0]))
                reply.rates.append(int(result.as_numpy(c.SAMPLE_RATE.name)[0]))
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        else:
            reply.error = "timed out"
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
    assert a.shape == b.shape, (a.shape, b.shape)
    assert int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()) <= 2


def _ref(engine: Synthesizer2, text: str, voice: bytes, params: dict, emotion: EmotionOptions = EmotionOptions(),
         seg: int = SEG):
    return engine.synthesize(text, voice, v2_generation_params(**params), emotion=emotion,
                             max_text_tokens_per_segment=seg)


def _assert_equals_engine(reply: Reply, ref) -> None:
    assert reply.error is None, reply.error
    n = len(reply.chunks)
    assert n == len(ref.segments) and reply.indices == list(range(n))
    assert reply.last_flags == [False] * (n - 1) + [True] and set(reply.rates) == {22050}
    assert [i["codes"] for i in reply.infos] == [len(s.codes) for s in ref.segments]
    _close(reply.audio, ref.pcm16)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_served_audio_equals_synthesizer2(server, engine, voice, params):
    reply = stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, **params)
    ref = _ref(engine, TEXT, voice, params)
    assert len(ref.segments) == 2 and np.abs(ref.pcm16).max() > 100
    _assert_equals_engine(reply, ref)
    # upstream's 200 ms of zeros end every segment but the last (and the segments' own audio is not silent)
    gap = interval_samples(22050, 200)
    first = reply.chunks[0]
    assert gap == 4410 and not first[-gap:].any() and first[:-gap].any() and reply.chunks[-1][-50:].any()
    assert first.size - gap == ref.segments[0].pcm16.size


def test_interval_silence_ms_per_request(server, model, voice):
    reply = stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, interval_silence_ms=50, **GREEDY)
    ref = Synthesizer2(model, max_reference_seconds=15.0, interval_silence_ms=50).synthesize(
        TEXT, voice, v2_generation_params(**GREEDY), max_text_tokens_per_segment=SEG)
    _assert_equals_engine(reply, ref)
    assert not reply.chunks[0][-interval_samples(22050, 50):].any()


@pytest.mark.parametrize("case", ["vector", "audio_alpha", "random", "text"])
def test_emotion_controls_equal_engine_ref(server, engine, voice, emotion_wav, case):
    emo_bytes = emotion_wav.read_bytes()
    served, emotion = {
        "vector": ({"emo_vector": VECTOR}, EmotionOptions(vector=VECTOR)),
        "audio_alpha": ({"emotion_audio": emo_bytes, "emo_alpha": 0.6}, EmotionOptions(reference=emo_bytes, alpha=0.6)),
        "random": ({"emo_vector": VECTOR, "emo_random": True}, EmotionOptions(vector=VECTOR, random=True)),
        "text": ({"emo_text": "I am so happy today!"}, EmotionOptions(text="I am so happy today!")),
    }[case]
    reply = stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, **served, **GREEDY)
    ref = _ref(engine, TEXT, voice, GREEDY, emotion)
    _assert_equals_engine(reply, ref)
    # the control changes the output (else the comparison would prove nothing about it)
    other = _ref(engine, TEXT, voice, GREEDY, EmotionOptions(vector=VECTOR) if case == "random" else EmotionOptions())
    assert ref.pcm16.shape != other.pcm16.shape or np.abs(ref.pcm16.astype(np.int32) - other.pcm16).max() > 2


# ------------------------------------------------------------------------------------------------ batching

TEXTS = ["A first sentence that takes a while to say. It goes on a little.",
         "The second one is here, also fairly long. It has a tail too.",
         "Third: numbers like twenty and thirty. Then forty.",
         "And the fourth, which closes the set. The end."]


def _wait_for(pred, timeout: float = 30.0, every: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def test_four_concurrent_requests_share_diffusion_steps_and_equal_their_solo_results(server, voice):
    solo = [stream(server, t, voice, max_text_tokens_per_segment=SEG, **GREEDY) for t in TEXTS]
    assert all(r.error is None and len(r.chunks) >= 2 for r in solo)
    before = metrics(server)
    results: list[Reply | None] = [None] * 4

    def go(i):
        results[i] = stream(server, TEXTS[i], voice, max_text_tokens_per_segment=SEG, **GREEDY)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads[:3]:
        t.start()
    # the fourth starts once the others are diffusing
    assert _wait_for(lambda: metrics(server).get("tts_s2mel_active_requests", 0) >= 1)
    threads[3].start()
    for t in threads:
        t.join()
    after = metrics(server)
    for r, ref in zip(results, solo):
        assert r is not None and r.error is None
        _close(r.audio, ref.audio)
    # one estimator call held several requests' CFG pairs, and segments joined while others were mid-diffusion
    assert after["tts_s2mel_batch_rows_max"] > 2, after
    assert after["tts_s2mel_shared_steps_total"] > before.get("tts_s2mel_shared_steps_total", 0)
    assert after["tts_s2mel_joins_mid_diffusion_total"] > before.get("tts_s2mel_joins_mid_diffusion_total", 0)
    assert after["tts_s2mel_active_requests"] == 0 and after["tts_s2mel_queued_requests"] == 0


# ------------------------------------------------------------------------------------------------ cancellation


def test_cancellation_mid_diffusion_frees_the_rows(server, voice):
    long_text = "This request is long and will be cancelled. " * 6
    for _ in range(3):  # the diffusion window of a tiny segment is short; retry if the cancel landed outside it
        before = metrics(server)
        reply = stream(server, long_text, voice, max_text_tokens_per_segment=12, **GREEDY,
                       cancel_when=lambda: metrics(server).get("tts_s2mel_active_requests", 0) >= 1)
        assert reply.error == "cancelled by the test"

        def freed():
            m = metrics(server)
            return (m.get("tts_s2mel_active_requests", 1) == 0 and m.get("tts_decoder_active_sequences", 1) == 0
                    and m.get("tts_requests_cancelled_total", 0) > before.get("tts_requests_cancelled_total", 0))

        assert _wait_for(freed, timeout=20), metrics(server)
        after = metrics(server)
        if after.get("tts_s2mel_requests_cancelled_total", 0) > before.get("tts_s2mel_requests_cancelled_total", 0):
            break
    else:
        pytest.fail(f"no cancel reached s2mel mid-diffusion in 3 tries: {metrics(server)}")
    # the cancel took effect before the next step
    assert after["tts_s2mel_cancel_lag_steps_max"] <= 1, after
    # and the server serves the next request normally
    assert stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, **GREEDY).error is None


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def good_solo(server, voice) -> np.ndarray:
    return stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, **GREEDY).audio


BAD = {
    "vector_length": ({"emo_vector": [0.1] * 7}, "EMO_VECTOR"),
    "vector_range": ({"emo_vector": [1.5, 0, 0, 0, 0, 0, 0, 0]}, "EMO_VECTOR"),
    "vector_nan": ({"emo_vector": [float("nan")] + [0.0] * 7}, "EMO_VECTOR"),
    "alpha": ({"emo_alpha": 2.0}, "EMO_ALPHA"),
    "text_empty": ({"emo_text": "   "}, "EMO_TEXT"),
    "text_and_vector": ({"emo_text": "happy", "emo_vector": list(VECTOR)}, "EMO_TEXT"),
    "random_alone": ({"emo_random": True}, "EMO_RANDOM"),
    "interval": ({"interval_silence_ms": 20_000}, "INTERVAL_SILENCE_MS"),
    "emotion_audio": ({"emotion_audio": b"not audio at all" * 20}, "EMOTION_AUDIO"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_v2_input_is_refused_by_name_while_a_good_request_completes(server, voice, good_solo, case):
    extra, needle = BAD[case]
    good: dict = {}
    t = threading.Thread(target=lambda: good.setdefault(
        "r", stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, **GREEDY)))
    t.start()
    time.sleep(0.2)  # the good request is under way
    reply = stream(server, TEXT, voice, max_text_tokens_per_segment=SEG, **extra, **GREEDY)
    assert reply.error is not None and needle in reply.error, reply.error
    unary = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as refused:
        unary.infer(c.OFFLINE_MODEL, _inputs(TEXT, voice, max_text_tokens_per_segment=SEG, **extra, **GREEDY),
                    client_timeout=60)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", (refused.value.status(), str(refused.value))
    assert needle in str(refused.value)
    t.join()
    assert good["r"].error is None and good["r"].last_flags[-1]
    _close(good["r"].audio, good_solo)


# ------------------------------------------------------------------------------------------------ the demo


def test_demo_streams_a_22khz_wav_through_the_server(server, engine, v2_voice_wav, tmp_path):
    """`triton-tts demo --family indextts2`'s last mile (triton_tts.demo.stream_to_file) on this module's server:
    upstream's default decoding (3-beam sampling, seed 0) through the client, into a 22.05 kHz WAV."""
    import wave

    from triton_tts.demo import stream_to_file

    out = tmp_path / "demo-v2.wav"
    timings, rate = stream_to_file(server.grpc_url, server.http_url, TEXT, v2_voice_wav, out, seed=0)
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2) and rate == 22050
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert timings.audio_s == pytest.approx(pcm.size / 22050) and timings.first_audio_s is not None
    ref = engine.synthesize(TEXT, v2_voice_wav, v2_generation_params(seed=0))
    _close(pcm, ref.pcm16)
