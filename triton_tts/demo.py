"""`triton-tts demo`: the main job end to end on the embedded tiny model.

Build the tiny preset (official on-disk format, random weights), export it to ONNX (verified against engine_ref),
build the Triton repository, start the real tritonserver on free ports, synthesize through the gRPC streaming
client, write the WAV, stop the server. Each step reuses what an earlier run left in the work directory.
`--engine-ref` skips Triton and synthesizes with the PyTorch reference engine instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_TEXT = (
    "Hello! This is triton-tts speaking with a tiny random model. It reads numbers like 42 and 2026, "
    "splits long text into segments, and streams 24 kHz audio as each segment is ready."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded tiny model: build, export, serve, synthesize, WAV")
    p.add_argument("--workdir", default="build/demo", help="where the model, export, repository and WAV go")
    p.add_argument("--text", default=DEMO_TEXT)
    p.add_argument("--out", help="output audio (default: <workdir>/demo.wav); .mp3/.opus/.flac work too")
    p.add_argument("--engine-ref", action="store_true", help="synthesize with the PyTorch reference engine only")
    p.set_defaults(func=cmd_demo)


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.perf_counter()


def cmd_demo(args: argparse.Namespace) -> int:
    from engine_ref.commands import ensure_demo_assets

    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else workdir / "demo.wav"
    t = _step(f"tiny model and demo voice in {workdir}")
    model_dir, voice = ensure_demo_assets(workdir)
    if args.engine_ref:
        return _engine_ref(model_dir, voice, args.text, out)

    from client import ClientConfig, GenerationOverrides, TTSClient
    from client.encode import open_writer
    from export.pipeline import ExportRequest, run_export
    from model_repository.builder import RepoOptions, build_repository
    from model_repository.server import ServerConfig, TritonServer, free_port

    t = _step("export to ONNX (verified against engine_ref; a no-op when up to date)")
    _, exported = run_export(ExportRequest(str(model_dir), workdir / "export"))
    print(f"    {'exported' if exported else 'up to date'} in {time.perf_counter() - t:.1f} s")
    _step("build the Triton model repository (cpu flavor)")
    repo = build_repository(workdir / "export", workdir / "repo", RepoOptions())
    t = _step("start tritonserver")
    with TritonServer(ServerConfig(repo, free_port(), free_port(), free_port())) as server:
        print(f"    ready in {time.perf_counter() - t:.1f} s: gRPC {server.grpc_url}, HTTP {server.http_url}, "
              f"metrics {server.metrics_url}")
        _step("synthesize over gRPC streaming")
        with TTSClient(ClientConfig(grpc_url=server.grpc_url, http_url=server.http_url)) as tts:
            stream = tts.synthesize_stream(args.text, voice, params=GenerationOverrides(seed=0))
            with stream, open_writer(out, 24000) as writer:
                for chunk in stream:
                    writer.write(chunk.pcm16)
                    print(f"    segment {chunk.segment_index + 1}/{chunk.segment_count}: "
                          f"{chunk.pcm16.size / 24000:.2f} s of audio at {chunk.elapsed_s:.2f} s")
            tm = stream.timings
        _step("stop tritonserver")
    print(f"wrote {out}: {tm.audio_s:.2f} s of 24 kHz audio; time to first audio {tm.first_audio_s:.2f} s, "
          f"total {tm.total_s:.2f} s, RTF {tm.rtf:.3f}")
    return 0


def _engine_ref(model_dir: Path, voice: Path, text: str, out: Path) -> int:
    from engine_ref.audio import write_wav
    from engine_ref.sampling import GenerationParams
    from engine_ref.synthesizer import Synthesizer

    _step("synthesize with engine_ref (PyTorch)")
    result = Synthesizer.from_pretrained(model_dir).synthesize(text, voice, GenerationParams(seed=0))
    write_wav(out, result.pcm16, result.sample_rate)
    t = result.timings
    print(f"wrote {out}: {t.audio_s:.2f} s of audio, RTF {t.rtf:.3f}")
    return 0
