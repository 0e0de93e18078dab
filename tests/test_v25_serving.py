"""IndexTTS-2.5 served end to end (tiny-v2.5): the real tritonserver over the built repository vs engine_ref's
Synthesizer25.

Served audio == Synthesizer25 (greedy, int16 within 2 LSB, 22.05 kHz) in each of the five languages, one request
each; DURATION_FACTOR scales every segment to int(2N * 1.72 * factor) mel frames as engine_ref; concurrent requests
in different languages each equal their solo result while `s2mel` batches their diffusion steps; a missing or
unknown LANGUAGE and an out-of-range DURATION_FACTOR get INVALID_ARGUMENT naming the input while a concurrent good
request completes; IndexTTS 1.x / 2.0 entry models refuse both inputs by name; the demo's client path (3-beam
sampling, Controls(language=...)) writes a 22.05 kHz WAV equal to engine_ref's.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from engine_ref.errors import InputError
from engine_ref.indextts2.gpt import v2_generation_params
from engine_ref.indextts2.v25.s2mel import target_mel_frames_v25
from engine_ref.indextts2.v25.synthesizer import Synthesizer25
from model_repository import contract as c
from model_repository.builder import RepoOptions, build_repository
from model_repository.server import ServerConfig, TritonServer, free_port
from tests.test_v2_serving import Reply, _close, _inputs, _wait_for, metrics, stream
from tests.test_v25_engine import TEXTS  # one sentence per language, shared by the 2.5 tests

SEG = 20  # MAX_TEXT_TOKENS_PER_SEGMENT: Japanese splits in two, the others stay one segment
GREEDY = {"do_sample": False, "num_beams": 1, "seed": 5}
SAMPLES_PER_FRAME = 256

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_v25_export_dir, tmp_path_factory):
    repo = build_repository(tiny_v25_export_dir, tmp_path_factory.mktemp("serving-v25") / "repo",
                            RepoOptions(max_sequences=8, s2mel_max_rows=16))
    srv = TritonServer(ServerConfig(repo, free_port(), free_port(), free_port()))
    srv.start(timeout_s=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def engine(tiny_v25_model_dir) -> Synthesizer25:
    return Synthesizer25.from_pretrained(tiny_v25_model_dir)  # 15 s references, 25 steps: the repository's


@pytest.fixture(scope="module")
def voice(v2_voice_wav) -> bytes:
    return v2_voice_wav.read_bytes()


@pytest.fixture(scope="module")
def refs(engine, voice) -> dict:
    """engine_ref's greedy result per language (computed once, shared by the parity and concurrency tests)."""
    return {lang: engine.synthesize(text, voice, v2_generation_params(**GREEDY), lang=lang,
                                    max_text_tokens_per_segment=SEG) for lang, text in TEXTS.items()}


def _assert_equals_engine(reply: Reply, ref) -> None:
    assert reply.error is None, reply.error
    n = len(reply.chunks)
    assert n == len(ref.segments) and reply.indices == list(range(n)) and set(reply.rates) == {22050}
    assert [i["codes"] for i in reply.infos] == [len(s.codes) for s in ref.segments]
    _close(reply.audio, ref.pcm16)


# ------------------------------------------------------------------------------------------------ parity


def test_repository_serves_the_25_graphs_with_language_preprocess(server):
    repo = server.config.repository
    pre = (repo / c.PREPROCESS / "config.pbtxt").read_text()
    assert '"LANGUAGE"' in pre and '"SEGMENT_LANG_IDS"' in pre
    dec = (repo / c.DECODER / "config.pbtxt").read_text()
    assert '"latent_pass"' in dec and '"remove_long_silence"' in dec
    for leaf in ("speaker_projection", "codec_decoder", "s2mel_cond", "s2mel_prompt", c.S2MEL):
        assert (repo / leaf / "config.pbtxt").is_file(), leaf
    for absent in ("semantic_codec", "speaker_conditioner"):
        assert not (repo / absent).exists(), absent


@pytest.mark.parametrize("lang", list(TEXTS))
def test_served_audio_equals_synthesizer25_in_each_language(server, refs, voice, lang):
    reply = stream(server, TEXTS[lang], voice, max_text_tokens_per_segment=SEG, language=lang, **GREEDY)
    ref = refs[lang]
    assert np.abs(ref.pcm16).max() > 100 and all(s.codes for s in ref.segments)
    _assert_equals_engine(reply, ref)
    assert len(ref.segments) == (2 if lang == "ja" else 1)


def test_duration_factor_scales_length_as_engine_ref(server, engine, refs, voice):
    text, lang = TEXTS["es"], "es"
    base = refs[lang]
    (n,) = [len(s.codes) for s in base.segments]
    assert base.pcm16.size == target_mel_frames_v25([n])[0] * SAMPLES_PER_FRAME
    for factor in (0.5, 1.7):
        reply = stream(server, text, voice, max_text_tokens_per_segment=SEG, language=lang,
                       duration_factor=factor, **GREEDY)
        ref = engine.synthesize(text, voice, v2_generation_params(**GREEDY), lang=lang, duration_factor=factor,
                                max_text_tokens_per_segment=SEG)
        _assert_equals_engine(reply, ref)
        assert [s.codes for s in ref.segments] == [s.codes for s in base.segments]  # the codes do not change
        assert reply.audio.size == int(2 * n * 1.72 * factor) * SAMPLES_PER_FRAME  # only the mel length does
    # fp32 on the wire is read as the decimal that was sent: 1.1 is engine_ref's 1.1 exactly
    reply = stream(server, text, voice, max_text_tokens_per_segment=SEG, language=lang, duration_factor=1.1, **GREEDY)
    assert reply.audio.size == target_mel_frames_v25([n], 1.1)[0] * SAMPLES_PER_FRAME


# ------------------------------------------------------------------------------------------------ batching


def test_concurrent_requests_in_four_languages_share_diffusion_and_equal_their_solo_results(server, refs, voice):
    langs = ["zh", "en", "es", "ar"]
    before = metrics(server)
    results: dict[str, Reply] = {}

    def go(lang):
        results[lang] = stream(server, TEXTS[lang], voice, max_text_tokens_per_segment=SEG, language=lang, **GREEDY)

    threads = [threading.Thread(target=go, args=(lang,)) for lang in langs]
    for t in threads[:3]:
        t.start()
    assert _wait_for(lambda: metrics(server).get("tts_s2mel_active_requests", 0) >= 1)
    threads[3].start()  # joins while the others are diffusing
    for t in threads:
        t.join()
    after = metrics(server)
    for lang in langs:
        _assert_equals_engine(results[lang], refs[lang])
    assert after["tts_s2mel_batch_rows_max"] > 2, after
    assert after["tts_s2mel_shared_steps_total"] > before.get("tts_s2mel_shared_steps_total", 0)
    assert after["tts_s2mel_active_requests"] == 0 and after["tts_s2mel_queued_requests"] == 0


# ------------------------------------------------------------------------------------------------ bad input

BAD = [
    ({}, "LANGUAGE"),  # missing: never defaulted
    ({"language": "fr"}, "LANGUAGE"),
    ({"language": "en", "duration_factor": 2.5}, "DURATION_FACTOR"),
    ({"language": "en", "duration_factor": 0.4}, "DURATION_FACTOR"),
    ({"language": "en", "duration_factor": float("nan")}, "DURATION_FACTOR"),
]


def test_bad_language_and_duration_factor_are_refused_by_name_while_a_good_request_completes(server, refs, voice):
    good: dict = {}
    t = threading.Thread(target=lambda: good.setdefault("r", stream(
        server, TEXTS["ja"], voice, max_text_tokens_per_segment=SEG, language="ja", **GREEDY)))
    t.start()
    time.sleep(0.2)  # the good request is under way
    unary = grpcclient.InferenceServerClient(server.grpc_url)
    for extra, needle in BAD:
        reply = stream(server, TEXTS["en"], voice, max_text_tokens_per_segment=SEG, **extra, **GREEDY)
        assert reply.error is not None and needle in reply.error, (extra, reply.error)
        with pytest.raises(InferenceServerException) as refused:
            unary.infer(c.OFFLINE_MODEL, _inputs(TEXTS["en"], voice, **extra, **GREEDY), client_timeout=60)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", (extra, str(refused.value))
        assert needle in str(refused.value)
        if needle == "LANGUAGE":
            assert "zh, en, ja, es, ar, zhen" in str(refused.value)  # the choices, in the one-line fix
    t.join()
    _assert_equals_engine(good["r"], refs["ja"])


def test_1x_and_2_0_entry_models_refuse_the_25_inputs_by_name():
    """The other families' entry models refuse LANGUAGE / DURATION_FACTOR before any work (as V2_INPUTS for 1.x)."""
    from model_repository.models.indextts2_tts import TtsModelV2
    from model_repository.models.tts import TtsModel

    request = {c.LANGUAGE.name: np.array([b"en"], dtype=np.object_),
               c.DURATION_FACTOR.name: np.array([1.2], np.float32)}
    v2 = TtsModelV2.__new__(TtsModelV2)
    with pytest.raises(InputError, match="LANGUAGE, DURATION_FACTOR are inputs of IndexTTS-2.5; this server runs "
                                         "IndexTTS-2"):
        v2.request_options(request)
    v1 = TtsModel.__new__(TtsModel)
    with pytest.raises(InputError, match="LANGUAGE is an input of IndexTTS-2.5; this server runs IndexTTS 1.x"):
        asyncio.run(v1.job_from({c.LANGUAGE.name: request[c.LANGUAGE.name]}, None, "Hi.", []))
    assert v2.request_options({}) is None


# ------------------------------------------------------------------------------------------------ the demo / client


def test_client_flags_and_controls_carry_language_and_duration_factor():
    import argparse

    from client.commands import controls_from_args
    from client.request import Controls, TTSRequest

    controls = controls_from_args(argparse.Namespace(language=" es ", duration_factor=1.25))
    arrays = TTSRequest.build("Hola.", b"RIFF....", controls=controls).arrays()
    assert arrays[c.LANGUAGE.name].tolist() == [b"es"] and arrays[c.LANGUAGE.name].dtype == object
    assert arrays[c.DURATION_FACTOR.name].dtype == np.float32 and arrays[c.DURATION_FACTOR.name].tolist() == [1.25]
    assert c.LANGUAGE.name not in TTSRequest.build("Hi.", b"RIFF....").arrays()  # unset: not sent
    with pytest.raises(InputError, match="language"):
        Controls(language=" ")
    with pytest.raises(InputError, match="finite"):
        Controls(duration_factor=float("inf"))



def test_demo_client_path_writes_a_22khz_wav_equal_to_engine_ref(server, engine, v2_voice_wav, tmp_path):
    """`triton-tts demo --family indextts2.5`'s last mile (stream_to_file with Controls(language=...)): upstream's
    default decoding (3-beam sampling, seed 0) through the client, into a 22.05 kHz WAV."""
    import wave

    from client.request import Controls
    from triton_tts.demo import stream_to_file

    out = tmp_path / "demo-v25.wav"
    text = "Hello world."
    timings, rate = stream_to_file(server.grpc_url, server.http_url, text, v2_voice_wav, out, seed=0,
                                   controls=Controls(language="en", duration_factor=1.2))
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (22050, 1, 2) and rate == 22050
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert timings.audio_s == pytest.approx(pcm.size / 22050)
    ref = engine.synthesize(text, v2_voice_wav, v2_generation_params(seed=0), lang="en", duration_factor=1.2)
    _close(pcm, ref.pcm16)


# ------------------------------------------------------------------------------------------------ the gateway


def test_gateway_sends_the_language_2_5_requires_and_names_the_fix_when_there_is_none(server, refs, v2_voice_wav,
                                                                                        tmp_path):
    """OpenAI's API has no language field: `language` (an extra body field), else the gateway's default_language,
    else a 400 naming both; a language the model does not speak is a 400 listing those it does; a job with none
    is refused at submission. The served audio equals engine_ref's for the same language."""
    import httpx
    import openai

    from gateway.settings import GatewaySettings
    from gateway_support import start_gateway

    key = "v25-gateway-key"
    gateways = []
    try:
        for data, default in (("plain", None), ("default-es", "es")):
            gateways.append(start_gateway(GatewaySettings(
                triton_url=server.grpc_url, data_dir=tmp_path / data, api_keys=(key,), model_id="indextts-2.5",
                default_language=default)))
        auth = {"Authorization": f"Bearer {key}"}
        for gw in gateways:
            r = httpx.post(f"{gw.url}/v1/audio/voices", headers=auth, data={"name": "v"},
                           files={"audio": ("v.wav", v2_voice_wav.read_bytes(), "audio/wav")})
            assert r.status_code == 201, r.text
        plain, with_default = (openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=120)
                               for gw in gateways)
        extra = {**GREEDY, "max_text_tokens_per_segment": SEG}

        def speak(oai, text, **fields):
            return np.frombuffer(oai.audio.speech.create(model="tts-1", voice="v", input=text, response_format="pcm",
                                                         extra_body={**extra, **fields}).content, "<i2")

        _close(speak(plain, TEXTS["en"], language="en"), refs["en"].pcm16)
        _close(speak(with_default, TEXTS["es"]), refs["es"].pcm16)  # the gateway's default: es
        _close(speak(with_default, TEXTS["en"], language="EN"), refs["en"].pcm16)  # the request's wins
        longer = speak(plain, TEXTS["en"], language="en", duration_factor=1.5)
        assert longer.size > 1.3 * refs["en"].pcm16.size

        with pytest.raises(openai.BadRequestError) as missing:
            speak(plain, TEXTS["en"])
        body = missing.value.response.json()["error"]
        assert body["param"] == "language" and body["code"] == "missing_required_parameter"
        assert "--default-language" in body["message"] and "zh, en, ja, es, ar" in body["message"]
        with pytest.raises(openai.BadRequestError) as unknown:
            speak(plain, TEXTS["en"], language="fr")
        assert "'fr'" in unknown.value.response.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError) as factor:
            speak(plain, TEXTS["en"], language="en", duration_factor=3)
        assert factor.value.response.json()["error"]["param"] == "duration_factor"
        job = httpx.post(f"{gateways[0].url}/v1/audio/jobs", headers=auth, json={"input": TEXTS["en"], "voice": "v"})
        assert job.status_code == 400 and job.json()["error"]["param"] == "language", job.text
    finally:
        for gw in gateways:
            gw.stop()
