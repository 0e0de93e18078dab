"""Access to the gateway: API keys (hashed, from a file or the environment), 401s, per-key concurrency and
per-minute limits (429 + Retry-After), body and text limits (413), path traversal in voice names, CORS off unless
configured, loopback-only without keys, and the settings' one-line errors.

The gateway is real (uvicorn on a free port, HTTP from httpx and the openai SDK); Triton is replaced by a
scripted stand-in here, because these checks are about the gateway's own rules and need a stream that stays open
exactly as long as the test says. test_gateway_speech.py runs the same routes against a real tritonserver.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
import wave

import httpx
import numpy as np
import openai
import pytest

from engine_ref.errors import ConfigError
from gateway.auth import AccessControl, KeyRecord, hash_key, key_line, new_key, parse_keys_file
from gateway.settings import GatewaySettings
from gateway.triton import AudioChunk
from gateway_support import start_gateway, start_gateway_process

KEY_A = "key-alpha-0123456789"
KEY_B = "key-beta-9876543210"
KEY_ENV = "key-from-env-555"


def _wav(seconds: float = 1.0, rate: int = 24000, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 220 * t) * amplitude * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


class ScriptedTriton:
    """Stands in for TritonTTS: one chunk per call, then waits for `release` before the last one."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hold = False
        self.calls = 0

    async def stream(self, text, voice_audio=None, speaker_id=None, params=None, request_id="",
                     max_text_tokens_per_segment=None, controls=None):
        self.calls += 1
        pcm = (np.sin(np.arange(2400) / 5) * 8000).astype(np.int16)
        yield AudioChunk(pcm, 24000, 0, 2, False, {"codes": 10}, "spk")
        if self.hold:
            await asyncio.to_thread(self.release.wait, 30)
        yield AudioChunk(pcm, 24000, 1, 2, True, {"codes": 10}, "spk")

    async def ready(self) -> bool:
        return True

    async def models(self) -> list[str]:
        return ["tts", "tts_offline"]

    async def max_text_chars(self) -> int:
        return 20_000

    async def text_emotion(self) -> bool:
        return False  # an IndexTTS 1.x server

    async def languages(self) -> tuple[str, ...]:
        return ()

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("# gateway keys\n"
                    f"{key_line(KEY_A, name='alpha', concurrent=1, per_minute=1000)}\n"
                    f"\n{KEY_B} name=beta per_minute=3   # a plain key with its own budget\n")
    return path


@pytest.fixture(scope="module")
def gateway(keys_file, tmp_path_factory):
    settings = GatewaySettings.from_env_and_args(
        env={"TTS_GATEWAY_API_KEYS": KEY_ENV, "TTS_GATEWAY_API_KEYS_FILE": str(keys_file),
             "TTS_GATEWAY_MAX_UPLOAD_BYTES": "200000", "TTS_GATEWAY_MAX_TEXT_CHARS": "50"},
        data_dir=tmp_path_factory.mktemp("gw-auth-data"), triton_url="127.0.0.1:1")
    gw = start_gateway(settings)
    gw.app.state.triton = ScriptedTriton()
    yield gw
    gw.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_kept_as_digests_and_parsed_with_limits(keys_file):
    records = {r.name: r for r in parse_keys_file(keys_file, 8, 120)}
    assert records["alpha"] == KeyRecord(hash_key(KEY_A), "alpha", 1, 1000)
    assert records["beta"] == KeyRecord(hash_key(KEY_B), "beta", 8, 3)
    assert KEY_A not in key_line(KEY_A) and hash_key(KEY_A) in key_line(KEY_A)
    access = AccessControl(records.values(), 8, 120)
    assert all(len(d) == 64 for d in access._keys) and KEY_A not in repr(access._keys)
    assert new_key() != new_key() and len(new_key()) > 40


@pytest.mark.parametrize("line,needle", [
    ("sha256:abc name=x", "64 lowercase hex"),
    ("somekey colour=red", "unknown option"),
    ("somekey concurrent=two", "not a whole number"),
    ("somekey per_minute=0", "at least 1"),
])
def test_bad_keys_file_lines_name_the_line(tmp_path, line, needle):
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{line}\n")
    with pytest.raises(ConfigError, match=needle) as info:
        parse_keys_file(path, 8, 120)
    assert f"{path}:2" in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_keys_file(tmp_path / "missing", 8, 120)


def test_no_key_wrong_key_and_right_keys(gateway):
    url = f"{gateway.url}/v1/audio/voices"
    r = httpx.get(url)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers={"Authorization": "Basic abc"}).status_code == 401
    r = httpx.get(url, headers=_h("not-a-key"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY_A, KEY_ENV, KEY_B):  # digest line, environment, plain line
        assert httpx.get(url, headers=_h(key)).status_code == 200
    # The official SDK sees the same: AuthenticationError for a wrong key.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_ENV).models.list().data]
    # Unauthenticated on purpose: probes and metrics.
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200


def test_per_minute_limit_is_429_with_retry_after(gateway):
    url = f"{gateway.url}/v1/audio/voices"
    statuses = [httpx.get(url, headers=_h(KEY_B)).status_code for _ in range(2)]  # beta: 3 per minute
    statuses += [httpx.get(url, headers=_h(KEY_B)).status_code for _ in range(2)]
    assert statuses.count(200) <= 3 and statuses[-1] == 429
    r = httpx.get(url, headers=_h(KEY_B))
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60 and "per_minute" in r.json()["error"]["message"]
    assert httpx.get(url, headers=_h(KEY_ENV)).status_code == 200  # other keys are not affected
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY_B, max_retries=0).models.list()


def test_sliding_window_and_concurrency_bookkeeping():
    now = [1000.0]
    key = KeyRecord("d" * 64, "k", concurrent=2, per_minute=3)
    access = AccessControl([key], 8, 120, clock=lambda: now[0])
    releases = [access.admit(key) for _ in range(2)]
    with pytest.raises(Exception) as info:
        access.admit(key)  # 2 in progress: concurrency
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    releases[0]()
    releases[0]()  # idempotent: frees one slot only once
    assert access.active() == 1
    access.admit(key)()  # third request this minute
    now[0] += 20
    with pytest.raises(Exception) as info:
        access.admit(key)  # 3 in the window
    assert info.value.headers["Retry-After"] == "40"
    now[0] += 40.5  # the first requests left the window
    access.admit(key)()


def test_concurrent_limit_counts_a_stream_until_its_last_byte(gateway):
    fake = gateway.app.state.triton
    voice = httpx.post(f"{gateway.url}/v1/audio/voices", headers=_h(KEY_A), data={"name": "conc"},
                       files={"audio": ("v.wav", _wav())})
    assert voice.status_code == 201, voice.text
    body = {"model": "tts-1", "voice": "conc", "input": "Hi there.", "response_format": "pcm"}
    fake.hold = True  # alpha may run 1 request at a time
    fake.release.clear()
    try:
        with httpx.stream("POST", f"{gateway.url}/v1/audio/speech", json=body, headers=_h(KEY_A),
                          timeout=30) as first:
            assert first.status_code == 200
            pieces = first.iter_raw()  # keep the iterator: dropping it would hang up
            next(pieces)  # streaming: the handler returned long ago, the slot is still held
            second = httpx.post(f"{gateway.url}/v1/audio/speech", json=body, headers=_h(KEY_A))
            assert second.status_code == 429 and second.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert second.headers["retry-after"] == "1"
            fake.release.set()
            assert b"".join(pieces)  # the rest of the first stream
        deadline = time.monotonic() + 5
        while gateway.app.state.access.active():
            assert time.monotonic() < deadline, "the finished stream did not free its slot"
            time.sleep(0.02)
        fake.hold = False
        assert httpx.post(f"{gateway.url}/v1/audio/speech", json=body, headers=_h(KEY_A)).status_code == 200
    finally:
        fake.hold = False
        fake.release.set()


def test_oversized_bodies_are_413_before_being_read(gateway):
    big = _wav(seconds=5.0)  # 240 kB > the 200 kB limit
    r = httpx.post(f"{gateway.url}/v1/audio/voices", headers=_h(KEY_ENV), data={"name": "big"},
                   files={"audio": ("v.wav", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: chunked transfer, counted as it arrives
        for i in range(0, len(big), 16384):
            yield big[i:i + 16384]

    r = httpx.post(f"{gateway.url}/v1/audio/speech", headers={**_h(KEY_ENV), "Content-Type": "application/json"},
                   content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{gateway.url}/v1/audio/speech", headers=_h(KEY_ENV),
                   json={"model": "tts-1", "voice": "x", "input": "y" * 51})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input"
    names = [v["name"] for v in httpx.get(f"{gateway.url}/v1/audio/voices", headers=_h(KEY_ENV)).json()["data"]]
    assert "big" not in names


@pytest.mark.parametrize("name", ["../../evil", "..", ".hidden", "a/b", "a\\b", "x" * 65, "bad name", "ümlaut",
                                  "voice\x00"])
def test_path_traversal_and_bad_names_are_refused(gateway, name):
    data_dir = gateway.app.state.settings.data_dir
    before = sorted(p.relative_to(data_dir.parent) for p in data_dir.parent.rglob("*"))
    r = httpx.post(f"{gateway.url}/v1/audio/voices", headers=_h(KEY_ENV), data={"name": name},
                   files={"audio": ("v.wav", _wav())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    assert sorted(p.relative_to(data_dir.parent) for p in data_dir.parent.rglob("*")) == before


@pytest.mark.parametrize("path", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "voice_%2e%2e%2fvoice.json", ".hidden",
                                  "voice_0123"])
def test_voice_lookups_never_leave_the_voices_folder(gateway, path):
    r = httpx.get(f"{gateway.url}/v1/audio/voices/{path}/audio", headers=_h(KEY_ENV))
    assert r.status_code in (400, 404) and r.json()["error"]
    assert b"root:" not in r.content


def test_a_tampered_voice_folder_is_ignored(gateway):
    store = gateway.app.state.voices
    voice = store.add("tamper", _wav())
    meta = voice.audio_path.parent / "voice.json"
    meta.write_text(meta.read_text().replace('"audio_file": "audio.wav"', '"audio_file": "../../keys.txt"'))
    assert "tamper" not in [v.name for v in store.list()]
    r = httpx.get(f"{gateway.url}/v1/audio/voices/{voice.id}/audio", headers=_h(KEY_ENV))
    assert r.status_code == 404


def test_cors_is_off_unless_configured(gateway, tmp_path):
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    r = httpx.options(f"{gateway.url}/v1/audio/speech", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    gw = start_gateway(GatewaySettings(data_dir=tmp_path, api_keys=(KEY_A,),
                                       cors_origins=("https://app.example.com",)))
    try:
        r = httpx.options(f"{gw.url}/v1/audio/speech", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = httpx.options(f"{gw.url}/v1/audio/speech", headers={**preflight, "Origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
        r = httpx.get(f"{gw.url}/v1/audio/voices", headers={**_h(KEY_A), "Origin": "https://app.example.com"})
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    finally:
        gw.stop()


def test_without_keys_only_loopback_is_allowed(tmp_path):
    open_settings = GatewaySettings(host="0.0.0.0", data_dir=tmp_path)
    host, warning = open_settings.effective_host()
    assert host == "127.0.0.1" and "no API keys" in warning and "0.0.0.0" in warning
    assert GatewaySettings(host="0.0.0.0", api_keys=("k",)).effective_host() == ("0.0.0.0", None)
    assert GatewaySettings(host="::1").effective_host() == ("::1", None)
    proc = start_gateway_process("127.0.0.1:1", tmp_path / "data", "--bind", "0.0.0.0")
    try:
        assert httpx.get(f"{proc.url}/healthz").status_code == 200
    finally:
        proc.stop()
    log = proc.log_path.read_text()
    assert "listens on 127.0.0.1 only" in log and "open (no API keys)" in log


@pytest.mark.parametrize("env,needle", [
    ({"TTS_GATEWAY_PORT": "eighty"}, "TTS_GATEWAY_PORT"),
    ({"TTS_GATEWAY_MAX_JOBS": "0"}, "max_jobs"),
    ({"TTS_GATEWAY_TRITON_URL": "http://x:8001"}, "host:port"),
    ({"TTS_GATEWAY_DB_URL": "mysql://x"}, "postgresql"),
    ({"TTS_GATEWAY_CORS_ORIGINS": "example.com"}, "scheme://host"),
])
def test_bad_settings_are_one_line_config_errors(env, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        GatewaySettings.from_env_and_args(env=env)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_flags_override_the_environment(tmp_path):
    import argparse

    from gateway.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gateway", "--triton", "triton:9001", "--port", "9999", "--cors-origin",
                              "https://a.example", "--data-dir", str(tmp_path)])
    s = GatewaySettings.from_env_and_args(args, env={"TTS_GATEWAY_PORT": "7000", "TTS_GATEWAY_MAX_JOBS": "5"})
    assert (s.triton_url, s.port, s.max_jobs, s.cors_origins) == ("triton:9001", 9999, 5, ("https://a.example",))
    assert s.voices_dir == tmp_path / "voices" and s.database_url.endswith("jobs.sqlite3")
