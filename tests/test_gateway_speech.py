"""POST /v1/audio/speech through a real gateway in front of a real tritonserver (tiny model), with the official
`openai` package as the client: every response_format decoded with PyAV and compared with the same request sent
straight to Triton over gRPC (client.TTSClient), both stream formats, first audio before the last segment,
speed, long inputs split across requests, speaker-id reuse with fallback, client disconnects cancelling on the
server, and errors with OpenAI's status codes."""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.request

import httpx
import numpy as np
import openai
import pytest

from client import ClientConfig, TTSClient
from gateway.audio import TimeStretch
from gateway.settings import GatewaySettings
from gateway_support import GREEDY, decode, rms, start_gateway, start_triton

KEY = "speech-test-key"
TEXT = "Hello world. This is a test of the gateway, with numbers like 42!"
#: Several segments (small token budget per segment) for the streaming checks.
LONG = "One sentence here. Another sentence there. A third one follows. Then a fourth. And the fifth is last."
SEGMENTED = {**GREEDY, "max_text_tokens_per_segment": 8}
SERVER_TEXT_LIMIT = 120  # the server's max_text_chars: longer inputs are sent as several requests
MODEL = "indextts-1.5"


@pytest.fixture(scope="module")
def triton(tiny_export_dir, tmp_path_factory):
    server = start_triton(tiny_export_dir, tmp_path_factory.mktemp("gw-speech"), max_sequences=8,
                          max_text_chars=SERVER_TEXT_LIMIT)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(triton, tmp_path_factory):
    settings = GatewaySettings(triton_url=triton.grpc_url, data_dir=tmp_path_factory.mktemp("gw-speech-data"),
                               api_keys=(KEY,), max_requests_per_minute=10_000, max_concurrent_per_key=16,
                               max_text_chars=600)
    gw = start_gateway(settings)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def voice(gateway, voice_wav) -> str:
    r = httpx.post(f"{gateway.url}/v1/audio/voices", headers={"Authorization": f"Bearer {KEY}"},
                   data={"name": "demo"}, files={"audio": ("voice.wav", voice_wav.read_bytes(), "audio/wav")})
    assert r.status_code == 201, r.text
    return r.json()["name"]


@pytest.fixture(scope="module")
def oai(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(triton, voice_wav) -> dict[str, np.ndarray]:
    """The same requests straight to Triton over gRPC (the existing client): what the gateway must deliver."""
    out = {}
    with TTSClient(ClientConfig(grpc_url=triton.grpc_url, max_request_chars=SERVER_TEXT_LIMIT)) as tts:
        for name, text, params in (("text", TEXT, GREEDY), ("long", LONG, SEGMENTED)):
            result = tts.synthesize_stream(text, voice_wav, params={k: v for k, v in params.items()
                                                                    if k != "max_text_tokens_per_segment"},
                                           max_text_tokens_per_segment=params.get("max_text_tokens_per_segment"))
            res = result.collect()
            assert res.sample_rate == 24000
            out[name] = res.pcm16
            out[name + "_segments"] = res.segment_count
    return out


def _pcm(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2")


def _same_audio(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to the server's batching noise (segments batched with others: float sums reorder, <= 2 LSB)."""
    assert a.shape == b.shape
    assert int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()) <= 2


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).owned_by == "triton-tts"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("tts-2")


def test_pcm_equals_the_direct_grpc_result(oai, voice, direct):
    resp = oai.audio.speech.create(model=MODEL, voice=voice, input=TEXT, response_format="pcm", extra_body=GREEDY)
    assert resp.response.headers["content-type"] == "audio/pcm"
    assert resp.response.headers["x-sample-rate"] == "24000"
    pcm = _pcm(resp.content)
    assert pcm.size > 2400 and np.array_equal(pcm, direct["text"])


@pytest.mark.parametrize("fmt,container,rate,lossless,slack_s", [
    ("wav", "wav", 24000, True, 0.0),
    ("flac", "flac", 24000, True, 0.0),
    ("mp3", "mp3", 24000, False, 0.12),  # encoder delay + last-frame padding, no LAME tag on a stream
    ("aac", "aac", 24000, False, 0.12),  # ADTS: priming frames + last-frame padding
    ("opus", "ogg", 48000, False, 0.03),  # Opus decodes at 48 kHz whatever the input rate
])
def test_every_format_decodes_to_the_same_speech(oai, voice, direct, fmt, container, rate, lossless, slack_s):
    resp = oai.audio.speech.create(model="tts-1", voice=voice, input=TEXT, response_format=fmt, extra_body=GREEDY)
    samples, got_rate, got_container = decode(resp.content)
    assert (got_container, got_rate) == (container, rate)
    ref = direct["text"].astype(np.float32) / 32768.0
    expected_s = ref.size / 24000
    assert expected_s - 0.01 <= samples.size / rate <= expected_s + slack_s + 0.01
    assert rms(samples) > 0.3 * rms(ref) and rms(samples) < 3 * rms(ref)  # the speech survived encoding
    if lossless:
        assert np.array_equal(np.round(samples * 32768).astype(np.int16), direct["text"])


def _sse_events(resp) -> list[tuple[float, dict]]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append((time.perf_counter(), json.loads(line[6:])))
    return events


def test_sse_deltas_carry_the_audio_then_done_with_usage(oai, voice, direct):
    with oai.audio.speech.with_streaming_response.create(
            model=MODEL, voice=voice, input=LONG, response_format="pcm", stream_format="sse",
            extra_body=SEGMENTED) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp)
    kinds = [e["type"] for _, e in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"}
    audio = b"".join(base64.b64decode(e["audio"]) for _, e in events[:-1])
    _same_audio(_pcm(audio), direct["long"])
    usage = events[-1][1]["usage"]
    assert usage["input_tokens"] == len(LONG) and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_first_audio_arrives_before_the_last_segment_is_made(gateway, voice, direct, stream_format):
    """Arrival times of the response's pieces: one per segment, spread over the synthesis, not all at the end."""
    segments = direct["long_segments"]
    assert segments >= 4
    body = {"model": MODEL, "voice": voice, "input": LONG, "response_format": "pcm", "stream_format": stream_format,
            **SEGMENTED}
    arrivals = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{gateway.url}/v1/audio/speech", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        for piece in resp.iter_raw():
            if piece:
                arrivals.append(time.perf_counter())
    end = arrivals[-1]
    assert len(arrivals) >= segments  # nothing was buffered into one piece
    # The first audio came while later segments were still being generated: well before the end.
    assert arrivals[0] - start < 0.8 * (end - start)
    assert end - arrivals[0] > 0.05


def test_speed_is_a_pitch_preserving_time_stretch(oai, voice, direct):
    base_s = direct["text"].size / 24000
    for speed in (2.0, 0.25):  # 0.25 chains two atempo stages
        resp = oai.audio.speech.create(model=MODEL, voice=voice, input=TEXT, response_format="wav", speed=speed,
                                       extra_body=GREEDY)
        samples, rate, _ = decode(resp.content)
        assert samples.size / rate == pytest.approx(base_s / speed, rel=0.06)
        assert rms(samples) > 0.3 * rms(direct["text"] / 32768.0)


def test_time_stretch_keeps_the_pitch_of_a_tone():
    rate, freq = 24000, 440.0
    t = np.arange(rate * 2) / rate
    tone = (np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16)
    for speed in (0.25, 0.5, 1.5, 4.0):
        stretch = TimeStretch(rate, speed)
        out = np.concatenate([stretch.process(tone[i:i + 5000]) for i in range(0, tone.size, 5000)]
                             + [stretch.flush()])
        assert out.size / tone.size == pytest.approx(1 / speed, rel=0.05)
        spectrum = np.abs(np.fft.rfft(out.astype(np.float64) * np.hanning(out.size)))
        peak = np.fft.rfftfreq(out.size, 1 / rate)[int(np.argmax(spectrum))]
        assert peak == pytest.approx(freq, abs=3.0)  # tempo changed, pitch did not


def test_long_input_is_sent_as_several_requests_in_order(oai, voice, triton, voice_wav):
    text = " ".join(f"Sentence number {i} is here." for i in range(12))  # > SERVER_TEXT_LIMIT characters
    assert len(text) > SERVER_TEXT_LIMIT
    resp = oai.audio.speech.create(model=MODEL, voice=voice, input=text, response_format="pcm", extra_body=GREEDY)
    with TTSClient(ClientConfig(grpc_url=triton.grpc_url, max_request_chars=SERVER_TEXT_LIMIT)) as tts:
        expected = tts.synthesize_stream(text, voice_wav, params=GREEDY).collect()
    assert np.array_equal(_pcm(resp.content), expected.pcm16)


def test_speaker_id_is_reused_and_refreshed_when_the_server_forgot_it(oai, voice, gateway, direct):
    app = gateway.app
    stored = app.state.voices.get(voice)
    calls = []
    triton = app.state.triton
    original = triton.stream

    def spy(text, voice_audio=None, speaker_id=None, *args, **kwargs):
        calls.append((voice_audio is not None, speaker_id))
        return original(text, voice_audio, speaker_id, *args, **kwargs)

    triton.stream = spy
    try:
        oai.audio.speech.create(model=MODEL, voice=voice, input=TEXT, response_format="pcm", extra_body=GREEDY)
        known = app.state.voices.speaker_id(stored)
        assert known and calls[-1] == (False, known)  # the remembered id, no audio upload
        app.state.voices.remember_speaker_id(stored, "0" * 40 + "-15")  # an id this server never issued
        calls.clear()
        resp = oai.audio.speech.create(model=MODEL, voice=stored.id, input=TEXT, response_format="pcm",
                                       extra_body=GREEDY)
        assert calls == [(False, "0" * 40 + "-15"), (True, None)]  # refused, then the audio again
        assert app.state.voices.speaker_id(stored) == known
        assert np.array_equal(_pcm(resp.content), direct["text"])
    finally:
        triton.stream = original


def _server_metric(triton, name: str) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M))


def test_client_disconnect_cancels_the_request_on_the_server(gateway, voice, triton):
    before = _server_metric(triton, "tts_requests_cancelled_total")
    text = " ".join(["A long sentence that keeps the tiny model busy for a while."] * 2)
    body = {"model": MODEL, "voice": voice, "input": text, "response_format": "mp3", "do_sample": False,
            "num_beams": 1, "max_text_tokens_per_segment": 6}
    with httpx.stream("POST", f"{gateway.url}/v1/audio/speech", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        next(resp.iter_raw())  # the first audio, then hang up
    deadline = time.monotonic() + 30
    while _server_metric(triton, "tts_requests_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the server never saw the cancellation"
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while gateway.app.state.access.active():
        assert time.monotonic() < deadline, "the disconnected request still holds its slot"
        time.sleep(0.05)


def test_errors_have_openai_status_and_say_the_fix(oai, voice, gateway):
    def expect(exc_type, status, needle, **kwargs):
        args = {"model": MODEL, "voice": voice, "input": TEXT, **kwargs}
        with pytest.raises(exc_type) as info:
            oai.audio.speech.create(**args)
        assert info.value.status_code == status
        err = info.value.body
        assert needle in err["message"] and "Fix:" in err["message"], err
        return err

    assert expect(openai.NotFoundError, 404, "does not exist", model="tts-9")["code"] == "model_not_found"
    assert expect(openai.NotFoundError, 404, "no voice named", voice="nobody")["param"] == "voice"
    assert expect(openai.BadRequestError, 400, "not a valid voice", voice="../../etc/passwd")["param"] == "voice"
    assert expect(openai.BadRequestError, 400, "emotion", instructions="Speak happily.")["param"] == "instructions"
    assert expect(openai.BadRequestError, 400, "only IndexTTS-2.5", extra_body={"language": "en"})["code"] == \
        "unsupported_parameter"
    expect(openai.BadRequestError, 400, "response_format", response_format="ogg")
    expect(openai.BadRequestError, 400, "speed", speed=4.5)
    expect(openai.BadRequestError, 400, "input is empty", input="   ")
    assert expect(openai.APIStatusError, 413, "600", input="x" * 601)["param"] == "input"
    expect(openai.BadRequestError, 400, "unknown field", extra_body={"temprature": 0.5})
    # Refused by the server's model (its own message comes back), still a 400.
    expect(openai.BadRequestError, 400, "temperature", extra_body={"temperature": 1e-9})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0).audio.speech.create(
            model=MODEL, voice=voice, input=TEXT)
    # Empty instructions are no instructions.
    assert oai.audio.speech.create(model=MODEL, voice=voice, input="Fine.", instructions="", extra_body=GREEDY).content


def test_unreachable_triton_is_503_and_not_ready(tmp_path, voice_wav):
    from model_repository.server import free_port

    gw = start_gateway(GatewaySettings(triton_url=f"127.0.0.1:{free_port()}", data_dir=tmp_path,
                                       request_timeout_s=10))
    try:
        httpx.post(f"{gw.url}/v1/audio/voices", data={"name": "v"},
                   files={"audio": ("v.wav", voice_wav.read_bytes())}).raise_for_status()
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.audio.speech.create(model=MODEL, voice="v", input=TEXT)
        assert info.value.status_code == 503 and "cannot reach" in info.value.body["message"]
        assert info.value.response.headers["retry-after"]
        with pytest.raises(openai.InternalServerError):
            client.models.list()
        assert httpx.get(f"{gw.url}/readyz").status_code == 503
        assert httpx.get(f"{gw.url}/healthz").status_code == 200
    finally:
        gw.stop()


def test_metrics_count_requests_and_time_to_first_audio(gateway, oai, voice):
    oai.audio.speech.create(model=MODEL, voice=voice, input="Count me.", response_format="opus", extra_body=GREEDY)
    text = httpx.get(f"{gateway.url}/metrics").text
    ok = re.search(r'tts_gateway_requests_total\{method="POST",route="/v1/audio/speech",status="200"\} (\S+)', text)
    assert ok and float(ok.group(1)) >= 1
    ttfa = re.search(r'tts_gateway_ttfa_seconds_count\{format="opus",stream_format="audio"\} (\S+)', text)
    assert ttfa and float(ttfa.group(1)) >= 1
    assert re.search(r'tts_gateway_request_seconds_bucket\{le="\+Inf",method="POST",route="/v1/audio/speech"\}',
                     text)
    assert 'tts_gateway_jobs{state="queued"}' in text
    assert float(re.search(r"^tts_gateway_audio_seconds_total (\S+)$", text, re.M).group(1)) > 0


def test_concurrent_requests_run_side_by_side(oai, voice, direct):
    results: list = [None] * 6
    errors: list = []

    def go(i: int) -> None:
        try:
            results[i] = oai.audio.speech.create(model=MODEL, voice=voice, input=TEXT, response_format="pcm",
                                                 extra_body=GREEDY).content
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert all(np.array_equal(_pcm(r), direct["text"]) for r in results)
