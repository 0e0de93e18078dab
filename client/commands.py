"""`triton-tts client ...`: synthesize against a running server (gRPC streaming or HTTP) and check readiness.

Generation flags are engine_ref's (`add_generation_args`), but unlike the local `synth` command only the flags
the user typed are sent: the server owns the defaults.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from client.encode import AudioWriter, open_writer, output_format
from client.errors import ProtocolError
from client.request import Controls, GenerationOverrides, read_voice
from client.session import Chunk, ClientConfig, SynthesisStream, Timings, TTSClient
from engine_ref.commands import add_generation_args, read_text_arg
from model_repository import contract as c

__all__ = ["register", "generation_overrides", "controls_from_args", "cmd_synth", "cmd_ready"]

_DEFAULTS = ClientConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="talk to a running triton-tts server (synthesize, check readiness)")
    client_sub = p.add_subparsers(dest="client_command", metavar="SUBCOMMAND")
    client_sub.required = True

    s = client_sub.add_parser("synth", help="synthesize speech on the server and write WAV/MP3/Opus/FLAC")
    _add_server_args(s)
    text = s.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="text to speak")
    text.add_argument("--text-file", help="UTF-8 text file (long texts are split into several requests)")
    voice = s.add_mutually_exclusive_group(required=True)
    voice.add_argument("--ref", help="reference audio file (wav/flac/mp3/ogg)")
    voice.add_argument("--speaker-id", help="speaker id printed by an earlier run (reuses its voice, no upload)")
    s.add_argument("--out", required=True, help="output file: .wav, .mp3, .opus, .ogg (Opus) or .flac")
    s.add_argument("--no-stream", action="store_true",
                   help="one HTTP request per text part (model tts_offline) instead of gRPC streaming")
    s.add_argument("--model", help=f"model to call (default: {c.STREAM_MODEL} streaming, {c.OFFLINE_MODEL} "
                                   f"with --no-stream)")
    s.add_argument("--bitrate", help="MP3/Opus bitrate, e.g. 48k (default: 64k MP3, 32k Opus)")
    s.add_argument("--max-request-chars", type=int, default=_DEFAULTS.max_request_chars,
                   help="split longer texts into several requests (default: the server's max_text_chars)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_args(s)
    _add_control_args(s)
    # engine_ref's flag defaults to 120; here "not given" must stay None so the server's setting applies.
    s.set_defaults(max_text_tokens_per_segment=None, func=cmd_synth)

    r = client_sub.add_parser("ready", help="exit 0 when the server (and --model) is ready, 1 otherwise")
    _add_server_args(r)
    r.add_argument("--model", default=c.STREAM_MODEL, help=f"model to check (default {c.STREAM_MODEL}; '' for none)")
    r.set_defaults(func=cmd_ready)

    from client.jobs import register as register_jobs  # `client job ...`: long-form jobs on a gateway

    register_jobs(client_sub)


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=_DEFAULTS.grpc_url, help="gRPC host:port of the server")
    p.add_argument("--http", default=_DEFAULTS.http_url, help="HTTP host:port (used with --no-stream)")
    p.add_argument("--timeout", type=float, default=_DEFAULTS.timeout_s,
                   help="seconds to wait for the next response (the whole response with --no-stream)")


def _add_control_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("streaming chunks")
    g.add_argument("--chunk-first-codes", type=int,
                   help="codes in each segment's first streamed chunk (0: one chunk per segment; default: server's)")
    g.add_argument("--chunk-max-codes", type=int, help="largest chunk in codes (default: the server's)")
    e = p.add_argument_group("IndexTTS2 servers only (a 1.x server refuses these by name)")
    e.add_argument("--emo-ref", help="emotion reference audio file (default: the speaker reference)")
    e.add_argument("--emo-alpha", type=float, help="weight of the emotion reference in [0, 1]")
    e.add_argument("--emo-vector", help="8 comma-separated weights: happy,angry,sad,afraid,disgusted,melancholic,"
                                        "surprised,calm")
    e.add_argument("--emo-text", help="describe the emotion in words (the server's text-emotion model)")
    e.add_argument("--emo-random", action="store_true", default=None,
                   help="emotion-bank rows at random (seeded) instead of by similarity")
    e.add_argument("--interval-silence-ms", type=int, help="silence between segments (default: the server's)")
    v = p.add_argument_group("IndexTTS-2.5 servers only (other families refuse these by name)")
    v.add_argument("--language", help="the text's language: zh, en, ja, es, ar or zhen (required by IndexTTS-2.5)")
    v.add_argument("--duration-factor", type=float, help="speech length factor in [0.5, 2.0] (default 1.0)")


def controls_from_args(args: argparse.Namespace) -> Controls:
    """The chunk and emotion flags the user gave (the rest stay the server's)."""
    from engine_ref.indextts2.cli import parse_emotion_vector  # torch-free

    vector = getattr(args, "emo_vector", None)
    ref = getattr(args, "emo_ref", None)
    return Controls(chunk_first_codes=getattr(args, "chunk_first_codes", None),
                    chunk_max_codes=getattr(args, "chunk_max_codes", None),
                    emotion_audio=None if ref is None else read_voice(ref),
                    emo_alpha=getattr(args, "emo_alpha", None),
                    emo_vector=None if vector is None else parse_emotion_vector(vector),
                    emo_text=getattr(args, "emo_text", None), emo_random=getattr(args, "emo_random", None),
                    interval_silence_ms=getattr(args, "interval_silence_ms", None),
                    language=getattr(args, "language", None), duration_factor=getattr(args, "duration_factor", None))


def generation_overrides(args: argparse.Namespace) -> GenerationOverrides:
    """Only the generation flags the user gave (--greedy = no sampling and, unless --num-beams, one beam)."""
    values = {name: getattr(args, name, None) for name in c.PARAMS if name != "do_sample"}
    if getattr(args, "greedy", False):
        values["do_sample"] = False
        if values["num_beams"] is None:
            values["num_beams"] = 1
    return GenerationOverrides(**{k: v for k, v in values.items() if v is not None})


def _config(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(grpc_url=args.url, http_url=args.http, timeout_s=args.timeout,
                        max_request_chars=getattr(args, "max_request_chars", _DEFAULTS.max_request_chars))


@dataclass(frozen=True)
class Summary:
    path: Path
    audio_s: float
    segments: int
    parts: int
    speaker_id: str
    timings: Timings
    warnings: tuple[str, ...]


class _Progress:
    """A segment progress bar on stderr (parts x segments), shown only on a terminal."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self._bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                             TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console,
                             disable=not (enabled and console.is_terminal), transient=False)
        self._task = self._bar.add_task("waiting for the first audio", total=1.0)

    def __enter__(self) -> "_Progress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def update(self, chunk: Chunk) -> None:
        count = max(chunk.segment_count, 1)
        done_in_part = 1.0 if chunk.segment_index < 0 or chunk.is_last else (chunk.segment_index + 1) / count
        where = f"segment {min(chunk.segment_index + 1, count)}/{count}" if chunk.segment_index >= 0 else "done"
        if chunk.part_count > 1:
            where += f" (request {chunk.part_index + 1}/{chunk.part_count})"
        self._bar.update(self._task, total=float(chunk.part_count), completed=chunk.part_index + done_in_part,
                         description=where)


def write_stream(stream: SynthesisStream, out: str | Path, bitrate: str | None = None,
                 progress: bool = False) -> Summary:
    """Write chunks to `out` as they arrive (memory stays flat); the file appears only when all went well."""
    writer: AudioWriter | None = None
    segments: dict[int, int] = {}
    parts, speaker, warnings = 0, "", []
    try:
        with stream, _Progress(progress) as bar:
            for chunk in stream:
                if writer is None:
                    writer = open_writer(out, chunk.sample_rate, bitrate)
                elif chunk.sample_rate != writer.sample_rate:
                    raise ProtocolError(f"the sample rate changed mid-stream ({writer.sample_rate} -> "
                                        f"{chunk.sample_rate} Hz)", "use a client and a server from the same "
                                                                    "triton-tts version")
                writer.write(chunk.pcm16)
                segments[chunk.part_index] = chunk.segment_count
                parts, speaker = chunk.part_count, chunk.speaker_id or speaker
                warnings.extend(str(w) for w in _as_list(chunk.info.get("warnings")))
                bar.update(chunk)
        if writer is None:
            raise ProtocolError("the server finished without sending any audio",
                                "check the server log; use a client and a server from the same triton-tts version")
        path = writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return Summary(path, writer.seconds, sum(segments.values()), parts, speaker, stream.timings, tuple(warnings))


def _as_list(value: object) -> Iterator[object]:
    if value is None:
        return iter(())
    return iter(value) if isinstance(value, (list, tuple)) else iter((value,))


def cmd_synth(args: argparse.Namespace) -> int:
    output_format(args.out)  # an unsupported extension fails before any network traffic
    text = read_text_arg(args)
    overrides = generation_overrides(args)
    controls = controls_from_args(args)
    show_progress = not (args.no_progress or getattr(args, "quiet", False))
    with TTSClient(_config(args)) as client:
        call = client.synthesize_parts if args.no_stream else client.synthesize_stream
        model = args.model or (c.OFFLINE_MODEL if args.no_stream else c.STREAM_MODEL)
        stream = call(text, args.ref, args.speaker_id, overrides, args.max_text_tokens_per_segment, model=model,
                      controls=controls)
        summary = write_stream(stream, args.out, args.bitrate, show_progress)
    for w in summary.warnings:
        print(f"warning: {w}", file=sys.stderr)
    t = summary.timings
    ttfa = "n/a" if t.first_audio_s is None else f"{t.first_audio_s:.3f} s"
    rtf = "n/a" if t.rtf is None else f"{t.rtf:.3f}"
    how = f"HTTP, model {model}" if args.no_stream else f"gRPC stream, model {model}"
    print(f"wrote {summary.path} ({summary.audio_s:.2f} s of audio, {summary.segments} segment(s) in "
          f"{summary.parts} request(s))")
    print(f"time to first audio {ttfa}, total {t.total_s:.3f} s, RTF {rtf} ({how})")
    print(f"speaker id {summary.speaker_id} (pass --speaker-id to reuse this voice without uploading it)")
    return 0


def cmd_ready(args: argparse.Namespace) -> int:
    with TTSClient(_config(args)) as client:
        ok = client.server_ready(args.model or None)
    what = f"model {args.model!r} at {args.url}" if args.model else f"server at {args.url}"
    print(f"{what}: {'ready' if ok else 'NOT ready'}")
    return 0 if ok else 1
