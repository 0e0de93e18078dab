"""`triton-tts demo`: the main job end to end on the embedded tiny model.

Build the tiny preset (official on-disk format, random weights), export it to ONNX (verified against engine_ref),
build the Triton repository, start the real tritonserver on free ports, synthesize through the gRPC streaming
client, write the WAV, stop the server. Each step reuses what an earlier run left in the work directory.
`--engine-ref` skips Triton and synthesizes with the PyTorch reference engine instead. `--gateway` keeps the server
running behind the HTTP gateway (OpenAI-compatible speech API, voices, jobs, the web page) until Ctrl-C.
`--family indextts2` runs the same job for IndexTTS-2 on the tiny-v2 preset (its own model, export and repository
folders in the work directory; 22.05 kHz audio, the diffusion steps batched in the `s2mel` model).
`--family indextts2.5` does it for IndexTTS-2.5 on the tiny-v2.5 preset, in the `--language` given (default en).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_TEXT = (
    "Hello! This is triton-tts speaking with a tiny random model. It reads numbers like 42 and 2026, "
    "splits long text into segments, and streams 24 kHz audio as each segment is ready."
)
DEMO_TEXT_V2 = (
    "Hello! This is triton-tts speaking with a tiny random IndexTTS-2 model. It reads numbers like 42, "
    "diffuses every segment's mel in batches shared across requests, and streams 22.05 kHz audio."
)
DEMO_TEXT_V25 = (
    "Hello! This is triton-tts speaking with a tiny random IndexTTS-2.5 model. It speaks five languages, "
    "decodes 25 Hz codes and streams 22.05 kHz audio."
)
FAMILIES = ("indextts", "indextts2", "indextts2.5")
#: per family: (preset, work-directory suffix, default text)
_DEMOS = {"indextts": ("tiny", "", DEMO_TEXT), "indextts2": ("tiny-v2", "-v2", DEMO_TEXT_V2),
          "indextts2.5": ("tiny-v2.5", "-v25", DEMO_TEXT_V25)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded tiny model: build, export, serve, synthesize, WAV")
    p.add_argument("--workdir", default="build/demo", help="where the model, export, repository and WAV go")
    p.add_argument("--family", choices=FAMILIES, default="indextts",
                   help="indextts: IndexTTS 1.x on the tiny preset; indextts2: IndexTTS-2 on the tiny-v2 preset; "
                        "indextts2.5: IndexTTS-2.5 on the tiny-v2.5 preset")
    p.add_argument("--language", default="en",
                   help="indextts2.5 only: the text's language (zh, en, ja, es, ar, zhen; default en)")
    p.add_argument("--text", default=None, help="the text to speak (default: a demo sentence for the family)")
    p.add_argument("--out", help="output audio (default: <workdir>/demo.wav, demo-v2.wav / demo-v25.wav for "
                                 "indextts2 / indextts2.5); "
                                 ".mp3/.opus/.flac work too")
    p.add_argument("--engine-ref", action="store_true", help="synthesize with the PyTorch reference engine only")
    p.add_argument("--gateway", action="store_true",
                   help="then serve the HTTP gateway in front of the server (voice 'demo' stored) until Ctrl-C")
    p.add_argument("--gateway-port", type=int, default=8080, help="the gateway's port (with --gateway)")
    p.set_defaults(func=cmd_demo)


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.perf_counter()


def ensure_v2_demo_assets(workdir: Path) -> tuple[Path, Path]:
    """The tiny-v2 model and the demo voice under workdir, built once (rebuilt if the model fails verification)."""
    from engine_ref.indextts2.integrity import check_indextts2_dir
    from engine_ref.indextts2.presets import write_v2_preset

    model_dir = workdir / "tiny-v2-model"
    if not model_dir.exists() or not check_indextts2_dir(model_dir).ok:
        print(f"building the tiny-v2 preset in {model_dir} ...")
        write_v2_preset("tiny-v2", model_dir, layout="flat", force=True)
    return model_dir, _v2_demo_voice(workdir)


def ensure_v25_demo_assets(workdir: Path) -> tuple[Path, Path]:
    """The tiny-v2.5 model and the demo voice under workdir, built once (rebuilt if the model fails verification)."""
    from engine_ref.families import INDEXTTS2_5
    from engine_ref.indextts2.integrity import check_indextts2_dir
    from engine_ref.indextts2.v25.presets import write_v25_preset

    model_dir = workdir / "tiny-v2.5-model"
    if not model_dir.exists() or not check_indextts2_dir(model_dir, family=INDEXTTS2_5).ok:
        print(f"building the tiny-v2.5 preset in {model_dir} ...")
        write_v25_preset("tiny-v2.5", model_dir, force=True)
    return model_dir, _v2_demo_voice(workdir)


def _v2_demo_voice(workdir: Path) -> Path:
    """The IndexTTS2 / 2.5 demo voice (3 s at 24 kHz) under workdir, written once."""
    from engine_ref.audio import write_wav
    from engine_ref.indextts.presets import demo_voice

    voice = workdir / "voice-v2.wav"
    if not voice.exists():
        write_wav(voice, demo_voice(3.0, 24000), 24000)
    return voice


def stream_to_file(grpc_url: str, http_url: str, text: str, voice: Path, out: Path, seed: int = 0,
                   controls=None):
    """Synthesize over gRPC streaming into `out` at the server's sample rate (from the first response); the
    client's timings. The demo's last mile, also run by tests against a server they already have.
    `controls`: client.request.Controls (IndexTTS-2.5's language, ...)."""
    from client import ClientConfig, GenerationOverrides, TTSClient
    from client.encode import open_writer

    writer = None
    with TTSClient(ClientConfig(grpc_url=grpc_url, http_url=http_url)) as tts:
        stream = tts.synthesize_stream(text, voice, params=GenerationOverrides(seed=seed), controls=controls)
        try:
            with stream:
                for chunk in stream:
                    if writer is None:
                        writer = open_writer(out, chunk.sample_rate)
                    writer.write(chunk.pcm16)
                    print(f"    segment {chunk.segment_index + 1}/{chunk.segment_count}: "
                          f"{chunk.seconds:.2f} s of {chunk.sample_rate} Hz audio at {chunk.elapsed_s:.2f} s")
        finally:
            if writer is not None:
                writer.close()
        return stream.timings, (writer.sample_rate if writer is not None else 0)


def cmd_demo(args: argparse.Namespace) -> int:
    from engine_ref.commands import ensure_demo_assets

    family = args.family
    v2 = family == "indextts2"
    preset, suffix, default_text = _DEMOS[family]
    workdir = Path(args.workdir)
    text = args.text or default_text
    out = Path(args.out) if args.out else workdir / f"demo{suffix}.wav"
    language = getattr(args, "language", "en") if family == "indextts2.5" else None
    t = _step(f"{preset} model and demo voice in {workdir}")
    if family == "indextts2.5":
        model_dir, voice = ensure_v25_demo_assets(workdir)
    else:
        model_dir, voice = ensure_v2_demo_assets(workdir) if v2 else ensure_demo_assets(workdir)
    if args.engine_ref:
        return _engine_ref(model_dir, voice, text, out, family, language)

    from export.pipeline import ExportRequest, run_export
    from model_repository.builder import RepoOptions, build_repository
    from model_repository.server import ServerConfig, TritonServer, free_port

    t = _step("export to ONNX (verified against engine_ref; a no-op when up to date)")
    _, exported = run_export(ExportRequest(str(model_dir), workdir / f"export{suffix}"))
    print(f"    {'exported' if exported else 'up to date'} in {time.perf_counter() - t:.1f} s")
    _step("build the Triton model repository (cpu flavor)")
    repo = build_repository(workdir / f"export{suffix}", workdir / f"repo{suffix}", RepoOptions())
    t = _step("start tritonserver")
    with TritonServer(ServerConfig(repo, free_port(), free_port(), free_port())) as server:
        print(f"    ready in {time.perf_counter() - t:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}, "
              f"metrics {server.metrics_url}")
        _step("synthesize over gRPC streaming")
        controls = None
        if language is not None:
            from client.request import Controls

            controls = Controls(language=language)
        tm, rate = stream_to_file(server.grpc_url, server.http_url, text, voice, out, controls=controls)
        if args.gateway:
            from gateway.cli import serve_demo_gateway

            _step(f"serve the gateway on http://127.0.0.1:{args.gateway_port} (Ctrl-C stops it and the server)")
            serve_demo_gateway(server.grpc_url, workdir / "gateway-data", voice, args.gateway_port)
        _step("stop tritonserver")
    print(f"wrote {out}: {tm.audio_s:.2f} s of {rate / 1000:g} kHz audio; "
          f"time to first audio {tm.first_audio_s:.2f} s, total {tm.total_s:.2f} s, RTF {tm.rtf:.3f}")
    return 0


def _engine_ref(model_dir: Path, voice: Path, text: str, out: Path, family: str = "indextts",
                language: str | None = None) -> int:
    from engine_ref.audio import write_wav

    _step("synthesize with engine_ref (PyTorch)")
    if family == "indextts2.5":
        from engine_ref.indextts2.gpt import v2_generation_params
        from engine_ref.indextts2.v25.synthesizer import Synthesizer25

        result = Synthesizer25.from_pretrained(model_dir).synthesize(text, voice, v2_generation_params(seed=0),
                                                                      lang=language)
    elif family == "indextts2":
        from engine_ref.indextts2.gpt import v2_generation_params
        from engine_ref.indextts2.synthesizer import Synthesizer2

        result = Synthesizer2.from_pretrained(model_dir).synthesize(text, voice, v2_generation_params(seed=0))
    else:
        from engine_ref.sampling import GenerationParams
        from engine_ref.indextts.synthesizer import Synthesizer

        result = Synthesizer.from_pretrained(model_dir).synthesize(text, voice, GenerationParams(seed=0))
    write_wav(out, result.pcm16, result.sample_rate)
    t = result.timings
    print(f"wrote {out}: {t.audio_s:.2f} s of {result.sample_rate / 1000:g} kHz audio, RTF {t.rtf:.3f}")
    return 0
