"""The voices API round trip through a real gateway in front of a real tritonserver (tiny model): upload
(validated and decoded once), list / get / download, use by name and by id in speech (the audio equals a direct
gRPC request with the same recording), uploads the server cannot read itself (AAC in M4A) stored as float WAV,
persistence across a gateway restart, delete, and every refusal with its status."""

from __future__ import annotations

import io
import json
import wave

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from client import ClientConfig, TTSClient
from gateway.settings import GatewaySettings
from gateway.voices import VoiceStore
from gateway_support import GREEDY, decode, start_gateway, start_triton

TEXT = "Voices are stored once and used many times."
MODEL = "indextts-1.5"


@pytest.fixture(scope="module")
def triton(tiny_export_dir, tmp_path_factory):
    server = start_triton(tiny_export_dir, tmp_path_factory.mktemp("gw-voices"), max_sequences=4)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gw-voices-data")


@pytest.fixture(scope="module")
def gateway(triton, data_dir):
    gw = start_gateway(GatewaySettings(triton_url=triton.grpc_url, data_dir=data_dir, max_voice_seconds=20))
    yield gw
    gw.stop()


def _upload(gateway, name: str, data: bytes, filename: str = "voice.wav", field: str = "audio") -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/audio/voices", data={"name": name}, files={field: (filename, data)},
                      timeout=60)


def _direct(triton, audio: bytes, text: str = TEXT) -> np.ndarray:
    with TTSClient(ClientConfig(grpc_url=triton.grpc_url)) as tts:
        return tts.synthesize_stream(text, audio, params=GREEDY).collect().pcm16


def _speech(gateway, voice, text: str = TEXT) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.audio.speech.create(model=MODEL, voice=voice, input=text, response_format="pcm", extra_body=GREEDY)
    return np.frombuffer(resp.content, "<i2")


def _m4a(samples: np.ndarray, rate: int) -> bytes:
    """AAC in MP4 (what phones record): a container libsndfile, the server's decoder, cannot read."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def test_upload_list_get_download_and_speak(gateway, triton, voice_wav, data_dir):
    original = voice_wav.read_bytes()
    r = _upload(gateway, "narrator", original)
    assert r.status_code == 201, r.text
    voice = r.json()
    info = sf.info(io.BytesIO(original))
    assert voice["name"] == "narrator" and voice["id"].startswith("voice_")
    assert voice["seconds"] == pytest.approx(info.duration) and voice["sample_rate"] == info.samplerate
    assert voice["format"] == "wav" and voice["transcoded"] is False and voice["bytes"] == len(original)
    # Stored as uploaded, with its metadata, in a folder named by the id (never by the user's name).
    folder = data_dir / "voices" / voice["id"]
    meta = json.loads((folder / "voice.json").read_text())
    assert meta["name"] == "narrator" and (folder / meta["audio_file"]).read_bytes() == original
    listed = httpx.get(f"{gateway.url}/v1/audio/voices").json()
    assert listed["object"] == "list" and [v["id"] for v in listed["data"]] == [voice["id"]]
    assert httpx.get(f"{gateway.url}/v1/audio/voices/narrator").json() == voice
    assert httpx.get(f"{gateway.url}/v1/audio/voices/{voice['id']}").json() == voice
    assert httpx.get(f"{gateway.url}/v1/audio/voices/narrator/audio").content == original
    # By name, by id and as OpenAI's {"id": ...} object: the same audio as sending the recording to Triton.
    expected = _direct(triton, original)
    assert np.array_equal(_speech(gateway, "narrator"), expected)
    assert np.array_equal(_speech(gateway, voice["id"]), expected)
    assert np.array_equal(_speech(gateway, {"id": voice["id"]}), expected)


def test_openai_field_name_and_an_upload_the_server_cannot_read(gateway, triton):
    rate = 22050
    t = np.arange(int(2.5 * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)
    data = _m4a(samples, rate)
    r = _upload(gateway, "phone-memo", data, "memo.m4a", field="audio_sample")
    assert r.status_code == 201, r.text
    voice = r.json()
    assert voice["transcoded"] is True and voice["sample_rate"] == rate and voice["seconds"] > 2.4
    stored = httpx.get(f"{gateway.url}/v1/audio/voices/phone-memo/audio").content
    decoded, stored_rate = sf.read(io.BytesIO(stored), dtype="float32")
    assert stored_rate == rate and sf.info(io.BytesIO(stored)).subtype == "FLOAT"  # decoded once, not requantized
    reference, ref_rate, _ = decode(data)  # the test's own PyAV decode of the upload
    assert ref_rate == rate and np.allclose(decoded, reference, atol=1e-7)
    lag = int(np.argmax(np.correlate(decoded[:8192], samples[:4096], mode="valid")))  # AAC priming delay
    assert np.corrcoef(decoded[lag:lag + samples.size - 4096], samples[:samples.size - 4096 - 0])[0, 1] > 0.9
    assert np.array_equal(_speech(gateway, "phone-memo"), _direct(triton, stored))


def _wav(seconds: float, amplitude: float = 0.3, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(2 * np.pi * 200 * t) * amplitude * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"hello, this is not audio at all" * 10, "could not be decoded"),
    (_wav(2.0, amplitude=0.0), "silent"),
    (_wav(0.2), "0.20 s long"),
    (_wav(21.0), "longer than 20 s"),
    (_wav(1.0)[:60], "0.00 s long"),  # truncated: a header and a few samples
], ids=["empty", "not-audio", "silent", "too-short", "too-long", "truncated"])
def test_bad_audio_is_refused_with_the_reason(gateway, data, needle):
    r = _upload(gateway, "bad-audio", data)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "Fix:" in err["message"] and err["param"] == "audio"
    assert "bad-audio" not in [v["name"] for v in httpx.get(f"{gateway.url}/v1/audio/voices").json()["data"]]


def test_duplicate_missing_fields_and_unknown_voices(gateway):
    assert _upload(gateway, "twice", _wav(1.0)).status_code == 201
    r = _upload(gateway, "twice", _wav(1.0))
    assert r.status_code == 409 and r.json()["error"]["code"] == "voice_exists"
    r = httpx.post(f"{gateway.url}/v1/audio/voices", data={"name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio"
    r = httpx.post(f"{gateway.url}/v1/audio/voices", files={"audio": ("v.wav", _wav(1.0))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    for path in ("nobody", "voice_" + "0" * 24):
        r = httpx.get(f"{gateway.url}/v1/audio/voices/{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "voice_not_found"
    assert httpx.delete(f"{gateway.url}/v1/audio/voices/nobody").status_code == 404


def test_delete_then_gone_everywhere(gateway, data_dir):
    voice = _upload(gateway, "short-lived", _wav(1.5)).json()
    r = httpx.delete(f"{gateway.url}/v1/audio/voices/short-lived")
    assert r.status_code == 200 and r.json() == {"id": voice["id"], "name": "short-lived",
                                                 "object": "audio.voice.deleted", "deleted": True}
    assert not (data_dir / "voices" / voice["id"]).exists()
    assert httpx.get(f"{gateway.url}/v1/audio/voices/{voice['id']}").status_code == 404
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model=MODEL, voice="short-lived", input=TEXT)
    assert httpx.delete(f"{gateway.url}/v1/audio/voices/{voice['id']}").status_code == 404
    assert not [p for p in (data_dir / "voices").iterdir() if p.name.startswith(".")]  # no leftovers


def test_voices_survive_a_gateway_restart(gateway, triton, data_dir, voice_wav):
    before = httpx.get(f"{gateway.url}/v1/audio/voices").json()["data"]
    assert "narrator" in [v["name"] for v in before]
    second = start_gateway(GatewaySettings(triton_url=triton.grpc_url, data_dir=data_dir))
    try:
        assert httpx.get(f"{second.url}/v1/audio/voices").json()["data"] == before
        assert np.array_equal(_speech(second, "narrator"), _direct(triton, voice_wav.read_bytes()))
    finally:
        second.stop()
    assert [v.name for v in VoiceStore(data_dir / "voices").list()] == [v["name"] for v in before]
