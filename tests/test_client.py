"""client/: request building, response parsing, error mapping, long-text splitting, encoders and the CLI.

The gRPC and HTTP paths run against small in-process fakes that speak Triton's wire protocol (tritonclient's own
protobufs / binary-data HTTP), so the real tritonclient code is exercised: streaming with the empty final
response, cancellation, timeouts, server errors. End-to-end tests against a real Triton live elsewhere.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import wave
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import grpc
import numpy as np
import pytest
import soundfile as sf
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from client import commands
from client.encode import FORMATS, open_writer, output_format, write_audio
from client.errors import (
    EncodeError,
    ModelUnavailable,
    ProtocolError,
    RequestRejected,
    ServerInternalError,
    ServerTimeout,
    ServerUnavailable,
    clean_server_message,
    from_server_error,
)
from client.longform import split_text
from client.request import GenerationOverrides, TTSRequest
from client.session import ClientConfig, TTSClient, parse_chunk
from engine_ref.audio import wav_bytes
from engine_ref.errors import InputError, TTSError
from engine_ref.sampling import GenerationParams
from model_repository import contract as c

SR = 24000
VOICE = b"RIFF\x00\x00fake-voice\x00bytes"  # the client never decodes the voice; trailing NULs must survive

# ------------------------------------------------------------------------------------------------ wire helpers


def _encode(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_byte_tensor(np.asarray(arr, dtype=object)).item() if arr.size else b""
    return np.ascontiguousarray(arr, dtype=triton_to_np_dtype(datatype)).tobytes()


def _decode(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(shape)
    return np.frombuffer(raw, dtype=triton_to_np_dtype(datatype)).reshape(shape)


def outputs(segment: int, count: int, samples: int, is_last: bool, info: dict | None = None,
            speaker: str = "spk-1") -> dict[str, np.ndarray]:
    pcm = (np.arange(samples) % 200 - 100).astype(np.int16) * (segment + 1)
    return {
        c.AUDIO.name: pcm, c.SAMPLE_RATE.name: np.array([SR], np.int32),
        c.SEGMENT_INDEX.name: np.array([segment], np.int32), c.SEGMENT_COUNT.name: np.array([count], np.int32),
        c.IS_LAST.name: np.array([is_last]), c.SPEAKER_ID_OUT.name: np.array([speaker.encode()], dtype=object),
        c.INFO.name: np.array([json.dumps(info or {"segment": segment}).encode()], dtype=object),
    }


_DATATYPES = {f.name: f.client_type for f in c.RESPONSE_OUTPUTS}


def segments_script(count: int = 3, samples: int = 2400, delay: float = 0.0) -> Callable:
    def script(inputs: dict) -> list:
        steps: list = []
        for i in range(count):
            if delay:
                steps.append(("sleep", delay))
            steps.append(("out", outputs(i, count, samples, i == count - 1)))
        return steps + [("final",)]
    return script


@dataclass
class Received:
    model: str
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    request_id: str


@dataclass
class Fake:
    script: Callable = field(default_factory=segments_script)
    received: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    text_limit: int | None = None  # preprocess's max_text_chars in its model config (None: no such model)
    config_reads: int = 0

    def reset(self, script: Callable, text_limit: int | None = None) -> None:
        self.script, self.received, self.cancelled = script, [], threading.Event()
        self.text_limit, self.config_reads = text_limit, 0


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, fake: Fake):
        self.fake = fake

    def ModelConfig(self, request, context):
        self.fake.config_reads += 1
        if request.name != c.PREPROCESS or self.fake.text_limit is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}' is not found")
        resp = service_pb2.ModelConfigResponse()
        resp.config.name = c.PREPROCESS
        resp.config.parameters["max_text_chars"].string_value = str(self.fake.text_limit)
        return resp

    def ModelStreamInfer(self, request_iterator, context):
        # A cancel may land while the response generator is paused at a yield (gRPC then never resumes it), so
        # it is detected by the termination callback: the RPC ended before the request stream was exhausted.
        done, fake = threading.Event(), self.fake
        context.add_callback(lambda: done.is_set() or fake.cancelled.set())
        yield from self._serve(request_iterator, context)
        done.set()

    def _serve(self, request_iterator, context):
        for request in request_iterator:
            inputs = {t.name: _decode(raw, t.datatype, list(t.shape))
                      for t, raw in zip(request.inputs, request.raw_input_contents)}
            params = {k: v.WhichOneof("parameter_choice") and getattr(v, v.WhichOneof("parameter_choice"))
                      for k, v in request.parameters.items()}
            self.fake.received.append(Received(request.model_name, inputs, params, request.id))
            for step in self.fake.script(inputs):
                if step[0] == "sleep":
                    deadline = time.monotonic() + step[1]
                    while time.monotonic() < deadline:
                        if not context.is_active():
                            self.fake.cancelled.set()
                            return
                        time.sleep(0.005)
                elif step[0] == "error":
                    yield service_pb2.ModelStreamInferResponse(error_message=step[1])
                elif step[0] == "out":
                    resp = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                    for name, arr in step[1].items():
                        resp.outputs.add(name=name, datatype=_DATATYPES[name], shape=list(arr.shape))
                        resp.raw_output_contents.append(_encode(arr, _DATATYPES[name]))
                    yield service_pb2.ModelStreamInferResponse(infer_response=resp)
                elif step[0] == "final":
                    resp = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
                    resp.parameters["triton_final_response"].bool_param = True
                    yield service_pb2.ModelStreamInferResponse(infer_response=resp)


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: Fake

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.fake.config_reads += 1
        if self.path == f"/v2/models/{c.PREPROCESS}/config" and self.fake.text_limit is not None:
            body = {"name": c.PREPROCESS, "parameters": {"max_text_chars": {"string_value": str(self.fake.text_limit)}}}
            self._send(200, json.dumps(body).encode(), None)
        else:
            self._send(400, json.dumps({"error": "Request for unknown model"}).encode(), None)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        hlen = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        header, offset, inputs = json.loads(body[:hlen]), hlen, {}
        for inp in header["inputs"]:
            size = inp["parameters"]["binary_data_size"]
            inputs[inp["name"]] = _decode(body[offset:offset + size], inp["datatype"], inp["shape"])
            offset += size
        model = self.path.split("/")[3]
        self.fake.received.append(Received(model, inputs, header.get("parameters", {}), header.get("id", "")))
        for step in self.fake.script(inputs):
            if step[0] == "sleep":
                time.sleep(step[1])
            elif step[0] == "error":
                self._send(400, json.dumps({"error": step[1]}).encode(), None)
                return
            elif step[0] == "out":
                outs, blobs = [], []
                for name, arr in step[1].items():
                    blob = _encode(arr, _DATATYPES[name])
                    outs.append({"name": name, "datatype": _DATATYPES[name], "shape": list(arr.shape),
                                 "parameters": {"binary_data_size": len(blob)}})
                    blobs.append(blob)
                head = json.dumps({"model_name": model, "outputs": outs}).encode()
                self._send(200, head + b"".join(blobs), len(head))
                return

    def _send(self, status: int, payload: bytes, header_len: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if header_len else "application/json")
        if header_len:
            self.send_header("Inference-Header-Content-Length", str(header_len))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def grpc_fake():
    fake = Fake()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(fake), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def http_fake():
    fake = Fake(script=lambda inputs: [("out", outputs(-1, 2, 4800, True))])
    handler = type("Handler", (_HttpHandler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(grpc_url: str = "127.0.0.1:1", http_url: str = "127.0.0.1:1", **kw: Any) -> TTSClient:
    return TTSClient(ClientConfig(grpc_url=grpc_url, http_url=http_url, **kw))


# --------------------------------------------------------------------------------------------- request building


def test_overrides_mirror_the_contract():
    assert set(GenerationOverrides().__dataclass_fields__) == set(c.PARAMS)


def test_request_sends_exactly_the_set_inputs_with_contract_dtypes():
    req = TTSRequest.build("Hello.", VOICE, params=GenerationOverrides(temperature=0.7, seed=3))
    arrays = req.arrays()
    assert list(arrays) == ["TEXT", "REFERENCE_AUDIO", "TEMPERATURE", "SEED"]
    assert arrays["TEXT"].dtype == object and arrays["TEXT"].shape == (1,) and arrays["TEXT"][0] == b"Hello."
    assert arrays["REFERENCE_AUDIO"][0] == VOICE
    assert arrays["TEMPERATURE"].dtype == np.float32 and arrays["TEMPERATURE"].shape == (1,)
    assert arrays["SEED"].dtype == np.int64 and int(arrays["SEED"][0]) == 3

    full = TTSRequest.build("Hi.", speaker_id="spk", params=GenerationParams(seed=None), max_text_tokens_per_segment=80)
    names = set(full.arrays())
    assert names == {"TEXT", "SPEAKER_ID", "MAX_TEXT_TOKENS_PER_SEGMENT"} | {f.name for k, f in c.PARAMS.items()
                                                                              if k != "seed"}
    for attr, f in c.PARAMS.items():
        if attr != "seed":
            assert full.arrays()[f.name].dtype == triton_to_np_dtype(f.client_type)
    assert full.arrays()["DO_SAMPLE"].dtype == np.bool_ and bool(full.arrays()["DO_SAMPLE"][0]) is True

    mapping = TTSRequest.build("Hi.", VOICE, params={"top_k": 5, "temperature": None})
    assert set(mapping.arrays()) == {"TEXT", "REFERENCE_AUDIO", "TOP_K"}
    assert GenerationOverrides(top_k=5).resolved() == GenerationParams(top_k=5)


def test_infer_inputs_match_the_arrays():
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    req = TTSRequest.build("Hi.", VOICE, params=GenerationOverrides(do_sample=False, num_beams=1))
    for module in (grpcclient, httpclient):
        inputs = req.infer_inputs(module.InferInput)
        assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
            ("TEXT", "BYTES", [1]), ("REFERENCE_AUDIO", "BYTES", [1]), ("NUM_BEAMS", "INT32", [1]),
            ("DO_SAMPLE", "BOOL", [1])]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(text="   ", reference_audio=VOICE), "text is empty"),
    (dict(text="Hi."), "no voice"),
    (dict(text="Hi.", reference_audio="/nonexistent/voice.wav"), "does not exist"),
    (dict(text="Hi.", reference_audio=b""), "empty"),
    (dict(text="Hi.", reference_audio=VOICE, max_text_tokens_per_segment=0), "max_text_tokens_per_segment"),
    (dict(text="Hi.", reference_audio=VOICE, params={"top_k": 2.5}), "top_k"),
    (dict(text="Hi.", reference_audio=VOICE, params={"do_sample": 1}), "do_sample"),
    (dict(text="Hi.", reference_audio=VOICE, params={"temperature": float("nan")}), "temperature"),
    (dict(text="Hi.", reference_audio=VOICE, params={"length_penalty": 1.0}), "unknown generation parameter"),
    (dict(text="Hi.", reference_audio=VOICE, params=GenerationParams(length_penalty=1.0)), "length_penalty"),
    (dict(text="Hi.", reference_audio=VOICE, params={"seed": 2**70}), "seed"),
])
def test_bad_requests_are_input_errors(kwargs, needle):
    with pytest.raises(InputError, match=needle) as info:
        TTSRequest.build(**kwargs)
    assert ". Fix: " in str(info.value) and "\n" not in str(info.value)


def test_empty_reference_file_and_directory(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        TTSRequest.build("Hi.", tmp_path / "empty.wav")
    with pytest.raises(InputError, match="directory"):
        TTSRequest.build("Hi.", tmp_path)


# ---------------------------------------------------------------------------------------- parsing and errors


def test_parse_chunk_and_protocol_errors():
    outs = outputs(1, 4, 100, False, info={"text": "HELLO", "warnings": ["w"]})
    chunk = parse_chunk(outs.get, arrived_at=5.0, elapsed_s=0.25)
    assert chunk.pcm16.dtype == np.int16 and chunk.pcm16.shape == (100,)
    assert (chunk.sample_rate, chunk.segment_index, chunk.segment_count, chunk.is_last) == (SR, 1, 4, False)
    assert chunk.speaker_id == "spk-1" and chunk.info == {"text": "HELLO", "warnings": ["w"]}
    assert chunk.seconds == pytest.approx(100 / SR)

    with pytest.raises(ProtocolError, match="lacks the SEGMENT_COUNT"):
        parse_chunk({k: v for k, v in outs.items() if k != "SEGMENT_COUNT"}.get, 0.0, 0.0)
    with pytest.raises(ProtocolError, match="int16"):
        parse_chunk({**outs, "AUDIO": outs["AUDIO"].astype(np.float32)}.get, 0.0, 0.0)
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_chunk({**outs, "INFO": np.array([b"{oops"], dtype=object)}.get, 0.0, 0.0)


def test_server_messages_map_to_tts_errors():
    line = "top_p=2.0 is out of range. Fix: pass a top_p in (0, 1]."
    for raw in (line, f"in ensemble 'tts', {line}", f"[request id: abc] in ensemble 'tts', {line}",
                f"Failed to process the request(s) for model instance 'tts_bls_0_0', message: InputError: {line}"):
        err = from_server_error(InferenceServerException(raw, status="StatusCode.INVALID_ARGUMENT"), model="tts",
                                url="h:1")
        assert isinstance(err, RequestRejected) and isinstance(err, InputError)
        assert err.one_line() == line and err.problem == "top_p=2.0 is out of range"
    assert clean_server_message("[StatusCode.INTERNAL] in ensemble 'tts', boom\nstack") == "boom"

    cases = [
        (InferenceServerException("internal error: RuntimeError: x", status="StatusCode.INTERNAL"),
         ServerInternalError),
        (InferenceServerException("Request for unknown model: 'tts' is not found", status="400"), ModelUnavailable),
        (InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE"),
         ServerUnavailable),
        (InferenceServerException("unexpected inference input 'FOO' for model 'tts'", status="400"), ProtocolError),
        (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), ServerTimeout),
        (ConnectionRefusedError(111, "Connection refused"), ServerUnavailable),
        (TimeoutError("timed out"), ServerTimeout),
    ]
    for exc, cls in cases:
        err = from_server_error(exc, model="tts", url="h:1")
        assert type(err) is cls, (exc, err)
        assert isinstance(err, TTSError) and err.fix and "\n" not in err.one_line()


def test_split_text_keeps_everything_and_cuts_at_sentences():
    assert split_text("Short text.", 100) == ["Short text."]
    sentences = [f"Sentence number {i} is here." for i in range(40)]
    text = " ".join(sentences[:20]) + "\n\n" + " ".join(sentences[20:])
    parts = split_text(text, 200)
    assert all(len(p) <= 200 for p in parts) and len(parts) >= len(text) // 200
    assert " ".join(parts).split() == text.split()
    assert all(p.endswith(".") for p in parts)
    hard = split_text("x" * 250, 100)
    assert [len(p) for p in hard] == [100, 100, 50]
    assert split_text("Hello there.\n\n... !!!\n\nBye now.", 15) == ["Hello there.", "Bye now."]
    with pytest.raises(InputError):
        split_text("abc", 0)


# -------------------------------------------------------------------------------------------------------- gRPC


def test_stream_yields_segments_and_sends_only_set_inputs(grpc_fake):
    fake, url = grpc_fake
    fake.reset(segments_script(count=3, samples=2400))
    with _client(url) as client:
        stream = client.synthesize_stream("Hello world.", VOICE, params=GenerationOverrides(top_k=7),
                                          max_text_tokens_per_segment=60, request_id="rid-1")
        chunks = list(stream)
    assert [ch.segment_index for ch in chunks] == [0, 1, 2] and [ch.is_last for ch in chunks] == [0, 0, 1]
    assert all(ch.segment_count == 3 and ch.sample_rate == SR and ch.speaker_id == "spk-1" for ch in chunks)
    assert np.array_equal(chunks[1].pcm16, outputs(1, 3, 2400, False)[c.AUDIO.name])
    (got,) = fake.received
    assert got.model == c.STREAM_MODEL and got.request_id == "rid-1"
    assert got.parameters.get("triton_enable_empty_final_response") is True
    assert sorted(got.inputs) == ["MAX_TEXT_TOKENS_PER_SEGMENT", "REFERENCE_AUDIO", "TEXT", "TOP_K"]
    assert got.inputs["REFERENCE_AUDIO"][0] == VOICE and got.inputs["TOP_K"].dtype == np.int32
    t = stream.timings
    assert t.audio_s == pytest.approx(3 * 2400 / SR)
    assert 0 < t.first_audio_s <= t.total_s and t.rtf == pytest.approx(t.total_s / t.audio_s)
    assert all(0 < a.elapsed_s <= b.elapsed_s for a, b in zip(chunks, chunks[1:]))


def test_stream_client_is_reused_after_a_clean_finish(grpc_fake):
    fake, url = grpc_fake
    fake.reset(segments_script(count=1))
    with _client(url) as client:
        assert len(list(client.synthesize_stream("One.", speaker_id="spk-1"))) == 1
        assert len(client._grpc.idle) == 1
        result = client.synthesize_stream("Two.", speaker_id="spk-1", model=c.STREAM_MODEL).collect()
        assert len(client._grpc.idle) == 1
    assert result.segment_count == 1 and result.speaker_id == "spk-1" and result.pcm16.shape == (2400,)
    assert [r.model for r in fake.received] == [c.STREAM_MODEL, c.STREAM_MODEL]
    assert fake.received[1].inputs["SPEAKER_ID"][0] == b"spk-1"


def test_stream_server_error_keeps_the_models_message(grpc_fake):
    fake, url = grpc_fake
    line = "the text has nothing speakable (only punctuation). Fix: send words in Chinese or English."
    fake.reset(lambda inputs: [("error", f"in ensemble 'tts', {line}"), ("final",)])
    with _client(url) as client, pytest.raises(RequestRejected) as info:
        list(client.synthesize_stream("...", VOICE))
    assert info.value.one_line() == line


def test_stream_closed_early_cancels_on_the_server(grpc_fake):
    fake, url = grpc_fake
    fake.reset(lambda inputs: [("out", outputs(0, 3, 480, False)), ("sleep", 10.0), ("final",)])
    with _client(url) as client:
        stream = client.synthesize_stream("Long text.", VOICE)
        first = next(stream)
        started = time.monotonic()
        stream.close()
        assert fake.cancelled.wait(5.0), "the server never saw the cancellation"
        assert time.monotonic() - started < 5.0 and first.segment_index == 0
        assert client._grpc.idle == []  # a cancelled client is not reused


def test_keyboard_interrupt_in_the_consumer_cancels(grpc_fake):
    fake, url = grpc_fake
    fake.reset(lambda inputs: [("out", outputs(0, 2, 480, False)), ("sleep", 10.0), ("final",)])
    with _client(url) as client, pytest.raises(KeyboardInterrupt):
        with client.synthesize_stream("Long text.", VOICE) as stream:
            for _ in stream:
                raise KeyboardInterrupt
    assert fake.cancelled.wait(5.0)


def test_stream_timeout_is_bounded_and_clear(grpc_fake):
    fake, url = grpc_fake
    fake.reset(lambda inputs: [("sleep", 10.0), ("final",)])
    started = time.monotonic()
    with _client(url, timeout_s=0.4) as client, pytest.raises(ServerTimeout, match="sent nothing for 0.4 s"):
        list(client.synthesize_stream("Hi.", VOICE))
    assert time.monotonic() - started < 3.0
    assert fake.cancelled.wait(5.0)


def test_unreachable_server_is_a_one_line_error():
    with _client(f"127.0.0.1:{_free_port()}", timeout_s=5.0) as client:
        with pytest.raises(ServerUnavailable, match="cannot reach a Triton server") as info:
            list(client.synthesize_stream("Hi.", VOICE))
        assert "Fix:" in str(info.value)
        assert client.server_ready() is False


def test_long_text_is_split_into_ordered_requests(grpc_fake):
    fake, url = grpc_fake
    fake.reset(segments_script(count=2, samples=240))
    text = " ".join(f"Sentence {i} goes here." for i in range(12))
    with _client(url, max_request_chars=100) as client:
        chunks = list(client.synthesize_stream(text, VOICE, request_id="job"))
    texts = [r.inputs["TEXT"][0].decode() for r in fake.received]
    assert len(texts) >= 3 and all(len(t) <= 100 for t in texts) and " ".join(texts) == text
    assert all(r.inputs["REFERENCE_AUDIO"][0] == VOICE for r in fake.received)
    assert [r.request_id for r in fake.received] == [f"job-{i}" for i in range(len(texts))]
    assert [(ch.part_index, ch.segment_index) for ch in chunks] == [(p, s) for p in range(len(texts)) for s in (0, 1)]
    assert all(ch.part_count == len(texts) for ch in chunks)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_the_servers_text_limit_is_read_once_and_used(grpc_fake, http_fake, transport):
    fake, url = grpc_fake if transport == "grpc" else http_fake
    script = segments_script(count=1, samples=24) if transport == "grpc" else \
        (lambda inputs: [("out", outputs(-1, 1, 24, True))])
    fake.reset(script, text_limit=60)
    text = " ".join(f"Sentence {i} goes here." for i in range(10))  # 219 characters: 5 parts of 2 sentences
    with _client(url, url) as client:
        run = client.synthesize_stream if transport == "grpc" else client.synthesize_parts
        chunks = list(run(text, VOICE))
        list(run("Short.", VOICE))
    texts = [r.inputs["TEXT"][0].decode() for r in fake.received]
    assert len(texts) == 6 and all(len(t) <= 60 for t in texts) and " ".join(texts[:-1]) == text
    assert texts[-1] == "Short." and texts[:-1] == split_text(text, 60)
    assert [ch.part_count for ch in chunks] == [5] * 5 and fake.config_reads == 1
    fake.reset(script)  # a server without the parameter: the contract's default applies, no error
    with _client(url, url) as client:
        run = client.synthesize_stream if transport == "grpc" else client.synthesize_parts
        assert len(list(run(text, VOICE))) == 1


# -------------------------------------------------------------------------------------------------------- HTTP


def test_http_synthesize_returns_the_whole_utterance(http_fake):
    fake, url = http_fake
    fake.reset(lambda inputs: [("out", outputs(-1, 2, 4800, True, info={"segments": 2}))])
    with _client(http_url=url) as client:
        result = client.synthesize("Hello world.", VOICE, params={"seed": 5, "do_sample": False})
    (got,) = fake.received
    assert got.model == c.OFFLINE_MODEL
    assert sorted(got.inputs) == ["DO_SAMPLE", "REFERENCE_AUDIO", "SEED", "TEXT"]
    assert got.inputs["REFERENCE_AUDIO"][0] == VOICE and got.inputs["SEED"].dtype == np.int64
    assert result.pcm16.shape == (4800,) and result.sample_rate == SR and result.segment_count == 2
    assert result.infos == ({"segments": 2},) and result.speaker_id == "spk-1"
    t = result.timings
    assert t.first_audio_s == pytest.approx(t.total_s) and t.audio_s == pytest.approx(0.2)


def test_http_errors_and_timeouts(http_fake):
    fake, url = http_fake
    line = "reference audio is silent (peak amplitude 0.0e+00, below 0.0001). Fix: send a clip where the speaker " \
           "is clearly audible."
    fake.reset(lambda inputs: [("error", line)])
    with _client(http_url=url) as client, pytest.raises(RequestRejected) as info:
        client.synthesize("Hi.", VOICE)
    assert info.value.one_line() == line
    fake.reset(lambda inputs: [("sleep", 3.0), ("out", outputs(-1, 1, 10, True))])
    started = time.monotonic()
    with _client(http_url=url, timeout_s=0.4) as client, pytest.raises(ServerTimeout):
        client.synthesize("Hi.", VOICE)
    assert time.monotonic() - started < 2.5
    with _client(http_url=f"127.0.0.1:{_free_port()}") as client, pytest.raises(ServerUnavailable):
        client.synthesize("Hi.", VOICE)


def test_config_rejects_urls_with_schemes():
    with pytest.raises(InputError, match="host:port"):
        ClientConfig(grpc_url="http://localhost:8001")
    with pytest.raises(InputError, match="timeout_s"):
        ClientConfig(timeout_s=0)


# ----------------------------------------------------------------------------------------------------- encoders


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16)


@pytest.mark.parametrize("ext", [".wav", ".mp3", ".opus", ".ogg", ".flac"])
def test_encoders_round_trip(tmp_path, ext):
    pcm = _tone(1.5)
    path = tmp_path / f"out{ext}"
    with open_writer(path, SR) as writer:
        for i in range(0, pcm.size, 4000):
            writer.write(pcm[i:i + 4000])
    assert writer.seconds == pytest.approx(1.5)
    info = sf.info(str(path))
    assert info.samplerate == SR and info.channels == 1
    assert info.duration == pytest.approx(1.5, abs=0.08)
    assert info.format == {".wav": "WAV", ".mp3": "MP3", ".opus": "OGG", ".ogg": "OGG", ".flac": "FLAC"}[ext]
    decoded, _ = sf.read(str(path), dtype="int16")
    if ext in (".wav", ".flac"):  # lossless: bit exact
        assert np.array_equal(decoded, pcm)
    else:  # lossy: the tone survives (energy within a few dB)
        assert 0.5 < np.std(decoded.astype(float)) / np.std(pcm.astype(float)) < 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left


def test_streaming_wav_equals_engine_ref_wav_and_writes_incrementally(tmp_path):
    pcm = _tone(1.0)
    path = tmp_path / "x.wav"
    writer = open_writer(path, SR)
    sizes = []
    for i in range(0, pcm.size, 6000):
        writer.write(pcm[i:i + 6000])
        sizes.append(writer._tmp.stat().st_size)
        assert not path.exists()  # appears only when complete
    assert sizes == sorted(sizes) and sizes[-1] - sizes[0] >= 3 * 6000 * 2  # bytes reach disk as chunks arrive
    writer.close()
    assert path.read_bytes() == wav_bytes(pcm, SR)
    write_audio(tmp_path / "y.wav", pcm, SR)
    assert (tmp_path / "y.wav").read_bytes() == wav_bytes(pcm, SR)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (SR, 1, 2, pcm.size)


def test_ffmpeg_writer_streams_incrementally_and_abort_cleans_up(tmp_path):
    path = tmp_path / "x.flac"
    writer = open_writer(path, SR)
    writer.write(_tone(3.0))
    deadline = time.monotonic() + 5.0
    while not (writer._tmp.exists() and writer._tmp.stat().st_size > 0):
        assert time.monotonic() < deadline, "ffmpeg wrote nothing while the stream was open"
        time.sleep(0.02)
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_encoder_errors(tmp_path):
    with pytest.raises(InputError) as info:
        output_format(tmp_path / "x.aac")
    assert all(ext in str(info.value) for ext in FORMATS)
    with pytest.raises(InputError, match="without an extension"):
        open_writer(tmp_path / "noext", SR)
    with pytest.raises(EncodeError, match="ffmpeg failed") as err:
        write_audio(tmp_path / "x.mp3", _tone(0.5), SR, bitrate="-5k")
    assert "Fix:" in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 1000
    assert list(tmp_path.iterdir()) == []
    # float input goes through engine_ref's upstream-exact int16 conversion
    write_audio(tmp_path / "f.wav", np.array([0.5, -1.0, 2.0], np.float32), SR)
    assert sf.read(str(tmp_path / "f.wav"), dtype="int16")[0].tolist() == [16383, -32767, 32767]


# ---------------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triton-tts")
    commands.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parser_sends_only_given_flags(capsys):
    p = _parser()
    args = p.parse_args(["client", "synth", "--text", "Hi.", "--ref", "v.wav", "--out", "o.mp3"])
    assert args.url == "localhost:8001" and args.http == "localhost:8000" and not args.no_stream
    assert args.max_text_tokens_per_segment is None and commands.generation_overrides(args).explicit() == {}
    args = p.parse_args(["client", "synth", "--text-file", "t.txt", "--speaker-id", "spk", "--out", "o.wav",
                         "--greedy", "--top-k", "5", "--seed", "9", "--max-text-tokens-per-segment", "80"])
    assert commands.generation_overrides(args).explicit() == {"do_sample": False, "top_k": 5, "num_beams": 1,
                                                              "seed": 9}
    assert args.max_text_tokens_per_segment == 80
    args = p.parse_args(["client", "synth", "--text", "x", "--ref", "v", "--out", "o.wav", "--greedy",
                         "--num-beams", "3"])
    assert commands.generation_overrides(args).explicit() == {"do_sample": False, "num_beams": 3}
    for bad in (["--text", "a", "--text-file", "f", "--ref", "v"], ["--text", "a", "--ref", "v", "--speaker-id", "s"],
                ["--text", "a"], ["--ref", "v"]):
        with pytest.raises(SystemExit):
            p.parse_args(["client", "synth", "--out", "o.wav", *bad])
    capsys.readouterr()


def test_cli_synth_streams_to_flac_and_reports_timings(grpc_fake, tmp_path, capsys):
    fake, url = grpc_fake
    fake.reset(segments_script(count=3, samples=4800))
    voice = tmp_path / "voice.wav"
    voice.write_bytes(VOICE)
    out = tmp_path / "o.flac"
    args = _parser().parse_args(["client", "synth", "--url", url, "--text", "Hello there.", "--ref", str(voice),
                                 "--out", str(out), "--temperature", "0.5", "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "time to first audio" in printed and "RTF" in printed and "speaker id spk-1" in printed
    assert "0.60 s of audio, 3 segment(s) in 1 request(s)" in printed
    assert sf.info(str(out)).duration == pytest.approx(0.6, abs=0.01)
    assert sorted(fake.received[0].inputs) == ["REFERENCE_AUDIO", "TEMPERATURE", "TEXT"]


def test_cli_no_stream_and_failures_leave_no_file(http_fake, grpc_fake, tmp_path, capsys):
    fake, url = http_fake
    fake.reset(lambda inputs: [("out", outputs(-1, 2, 2400, True))])
    out = tmp_path / "o.wav"
    args = _parser().parse_args(["client", "synth", "--http", url, "--no-stream", "--text", "Hi.",
                                 "--speaker-id", "spk-1", "--out", str(out)])
    assert args.func(args) == 0 and "HTTP, model tts_offline" in capsys.readouterr().out
    assert sf.info(str(out)).frames == 2400

    gfake, gurl = grpc_fake
    gfake.reset(lambda inputs: [("out", outputs(0, 2, 480, False)), ("error", "internal error: boom"), ("final",)])
    bad = tmp_path / "bad.mp3"
    args = _parser().parse_args(["client", "synth", "--url", gurl, "--text", "Hi.", "--speaker-id", "s",
                                 "--out", str(bad)])
    with pytest.raises(ServerInternalError, match="boom"):
        args.func(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.wav"]
    args = _parser().parse_args(["client", "synth", "--text", "Hi.", "--speaker-id", "s", "--out", "x.aac"])
    with pytest.raises(InputError, match="cannot write .aac"):
        args.func(args)


def test_controls_become_the_contract_inputs_and_bad_ones_are_named():
    from client.request import Controls

    req = TTSRequest.build("Hi there.", b"RIFF", controls=Controls(
        chunk_first_codes=0, emo_vector=(0, 0, 0.8, 0, 0, 0, 0, 0), emo_text="calm", emo_random=True,
        interval_silence_ms=150))
    arrays = req.arrays()
    assert arrays[c.EMO_VECTOR.name].shape == (8,) and arrays[c.EMO_VECTOR.name].dtype == np.float32
    assert float(arrays[c.EMO_VECTOR.name][2]) == pytest.approx(0.8)
    assert arrays[c.EMO_TEXT.name][0] == b"calm" and bool(arrays[c.EMO_RANDOM.name][0])
    assert int(arrays[c.CHUNK_FIRST_CODES.name][0]) == 0 and int(arrays[c.INTERVAL_SILENCE_MS.name][0]) == 150
    assert c.EMO_ALPHA.name not in arrays and c.EMOTION_AUDIO.name not in arrays  # unset stays the server's
    with pytest.raises(InputError, match="emo_vector has 3 weights"):
        Controls(emo_vector=(1.0, 0.0, 0.0))
    with pytest.raises(InputError, match="chunk_first_codes"):
        Controls(chunk_first_codes=-1)
    with pytest.raises(InputError, match="emo_text"):
        Controls(emo_text="  ")
