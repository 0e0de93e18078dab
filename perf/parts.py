"""The sum-of-parts ceiling: what the served path could deliver at best if a level's work ran back to back.

The parts of one request are timed alone, through ONNX Runtime sessions on the exported graphs (the same graphs,
thread count and spinning as the server; export.runtime.OrtDecoder for the decoder, export.common.session for the
vocoder), while no server runs, in the same run and on the same machine as the served levels:
- preprocess: engine_ref's text frontend on the request's text (the code the `preprocess` model runs);
- prefill of each segment (batch 1, its real text ids);
- one decode step at each batch size b the level can reach, at the scenario's mean KV length;
- the latent pass of each segment (batch 1, its real code count, after its own prefix);
- the vocoder (batch 1) at the smallest and the largest number of latent frames the server vocoded in one call,
  fitted as fixed + per-frame seconds (its convolutions are linear in the frames). With chunked streaming a
  segment is vocoded in chunks, each with the context frames around it; the frames of every call are read from
  the responses (INFO code_range / codes_available) and the vocoder's context from the export manifest.
Each part is called back to back (`reps` after `warmup`), as it would run if the parts followed each other, and
the fastest call counts: nothing else on the cores. The cond encoder is not counted: the benchmark's voices are in
the server's speaker cache after warm-up.

The ceiling of a level of n requests at concurrency c (`ceiling`):

    time = sum over requests (preprocess + sum over segments (prefill + latent pass)
                              + sum over vocoder calls (fixed + per frame x frames))
           + generated tokens / b x step(b),   b = min(max_sequences, c x min(segments, segments_in_flight))

    ceiling = audio seconds of the n requests / time

i.e. every part at its one-request-alone speed on all cores, the decode steps batched as wide as the level allows,
and nothing else: no IPC, no Python, no waiting. Generated tokens are the level's codes kept x the tokens generated per code
kept in the single-stream level (the server's own counter, tts_generated_tokens_total); the step time at the scenario's mean KV length stands for the steps at every length (attention grows linearly with
it, so the mean length gives the mean step). Unknown: how far a batched prefill of sequences arriving together
beats prefills one by one (the ceiling counts them one by one), and how the chunked decoder's incremental latent
passes compare with one pass per segment (the ceiling times one pass per segment).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

__all__ = ["SegmentWork", "RequestWork", "ScenarioParts", "Ceiling", "decode_batch", "step_time", "ceiling",
           "PartsTimer", "vocoded_frames", "fit_linear"]


@dataclass(frozen=True)
class SegmentWork:
    """One segment of a request as the server decoded it."""

    text_ids: int  #: text ids without start/stop
    codes: int  #: codes after silence removal (latent frames the vocoder turns into audio)
    audio_s: float


@dataclass(frozen=True)
class RequestWork:
    scenario: str
    text_index: int
    segments: tuple[SegmentWork, ...]
    vocoder_frames: tuple[int, ...] = ()  #: latent frames of each vocoder call (context included)

    @property
    def audio_s(self) -> float:
        return sum(s.audio_s for s in self.segments)

    @property
    def codes(self) -> int:
        return sum(s.codes for s in self.segments)


@dataclass
class ScenarioParts:
    """Measured seconds of each part, alone. Keys of the per-request dicts: the request's text index."""

    scenario: str
    preprocess_s: dict[int, float] = field(default_factory=dict)
    prefill_s: dict[int, list[float]] = field(default_factory=dict)  #: per segment
    latents_s: dict[int, list[float]] = field(default_factory=dict)  #: per segment
    step_s: dict[int, float] = field(default_factory=dict)  #: decode batch -> seconds per step
    step_past: int = 0  #: KV length the steps were timed at
    vocoder_fixed_s: float = float("nan")  #: per call
    vocoder_s_per_frame: float = float("nan")
    vocoder_s_per_audio_s: float = float("nan")  #: per-frame cost x frames per audio second (for the report)
    tokens_per_code: float = float("nan")  #: generated tokens / codes kept, from the single-stream level


@dataclass(frozen=True)
class Ceiling:
    scenario: str
    concurrency: int
    requests: int
    batch: int  #: decode batch assumed
    audio_s: float
    serial_s: float  #: preprocess + prefill + latent pass + vocoder of every request, one after another
    decode_s: float  #: the level's decode steps at `batch`
    steps: float

    @property
    def time_s(self) -> float:
        return self.serial_s + self.decode_s

    @property
    def audio_per_wall(self) -> float:
        return self.audio_s / self.time_s if self.time_s > 0 else float("nan")


def decode_batch(concurrency: int, segments: int, max_sequences: int, segments_in_flight: int) -> int:
    """The widest decode batch a level can keep: each request has min(segments, window) sequences in flight."""
    if min(concurrency, segments, max_sequences, segments_in_flight) < 1:
        raise ValueError("concurrency, segments, max_sequences and segments_in_flight must be >= 1")
    return min(max_sequences, concurrency * min(segments, segments_in_flight))


def step_time(step_s: Mapping[int, float], batch: int) -> float:
    """Seconds per decode step at `batch`: measured, or linear between the nearest measured batch sizes (held
    flat beyond them)."""
    if not step_s:
        return float("nan")
    if batch in step_s:
        return float(step_s[batch])
    sizes = sorted(step_s)
    if batch <= sizes[0]:
        return float(step_s[sizes[0]])
    if batch >= sizes[-1]:
        return float(step_s[sizes[-1]])
    lo = max(s for s in sizes if s < batch)
    hi = min(s for s in sizes if s > batch)
    w = (batch - lo) / (hi - lo)
    return float(step_s[lo] * (1 - w) + step_s[hi] * w)


def ceiling(requests: Sequence[RequestWork], parts: ScenarioParts, concurrency: int, max_sequences: int,
            segments_in_flight: int) -> Ceiling:
    """The sum-of-parts ceiling of a level (see the module docstring); NaN parts give a NaN ceiling."""
    if not requests:
        raise ValueError("a level has at least one request")
    segs = max(1, round(statistics.median(len(r.segments) for r in requests)))
    batch = decode_batch(concurrency, segs, max_sequences, segments_in_flight)
    serial = 0.0
    audio = 0.0
    codes = 0
    for r in requests:
        pre = parts.preprocess_s.get(r.text_index, math.nan)
        prefill = parts.prefill_s.get(r.text_index, [math.nan] * len(r.segments))
        latents = parts.latents_s.get(r.text_index, [math.nan] * len(r.segments))
        frames = r.vocoder_frames or tuple(seg.codes for seg in r.segments)
        vocoder = sum(parts.vocoder_fixed_s + parts.vocoder_s_per_frame * f for f in frames if f > 0)
        serial += pre + sum(prefill) + sum(latents) + vocoder
        audio += r.audio_s
        codes += r.codes
    steps = codes * parts.tokens_per_code / batch
    decode = steps * step_time(parts.step_s, batch)
    return Ceiling(parts.scenario, concurrency, len(requests), batch, audio, serial, decode, steps)


def vocoded_frames(start: int, end: int, available: int, left: int, right: int) -> int:
    """Latent frames one chunk's vocoder call runs on: the chunk [start, end) with up to `left` frames before it
    and `right` after it, as far as the segment's codes then reached (model_repository/orchestrator.py)."""
    if end <= start:
        return 0
    return min(max(available, end), end + right) - max(0, start - left)


def fit_linear(points: Mapping[int, float]) -> tuple[float, float]:
    """(fixed, per unit) seconds through the smallest and the largest measured size; one size: all per unit. A
    negative fixed part (noise) is dropped: the line then goes through the origin and the largest point."""
    if not points:
        return float("nan"), float("nan")
    lo, hi = min(points), max(points)
    if lo == hi or lo <= 0:
        return 0.0, points[hi] / hi
    per = (points[hi] - points[lo]) / (hi - lo)
    fixed = points[lo] - per * lo
    if fixed < 0 or per < 0:
        return 0.0, points[hi] / hi
    return fixed, per


# ------------------------------------------------------------------------------------------------------- timing


def _best_time(fn: Callable[[], object], reps: int, warmup: int, gap_s: float) -> float:
    """The fastest of `reps` calls after `warmup`, back to back (`gap_s` idle before each, 0 by default: the
    ceiling assumes the parts follow each other on warm thread pools). The fastest, not the median: the ceiling
    is the part without contention, and on a shared machine other processes only ever add time."""
    times = []
    for r in range(warmup + reps):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        fn()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return float(min(times))


class PartsTimer:
    """ORT sessions over an export, built like the server's (threads, spinning), timing one part at a time."""

    def __init__(self, export_dir: Path, threads: int | None, spin_decoder: bool, spin_leaves: bool,
                 reps: int = 5, warmup: int = 1, gap_s: float = 0.0, seed: int = 0):
        from engine_ref.indextts.config import load_config
        from engine_ref.text import TextFrontend
        from export.common import session
        from export.manifest import read_manifest
        from export.runtime import OrtDecoder

        if reps < 1 or warmup < 0:
            raise ValueError("reps must be >= 1 and warmup >= 0")
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        cfg = load_config(self.export_dir / "config.yaml")
        self.frontend = TextFrontend(self.export_dir / cfg.bpe_model, start_text_token=cfg.gpt.start_text_token,
                                     stop_text_token=cfg.gpt.stop_text_token,
                                     number_text_tokens=cfg.gpt.number_text_tokens)
        self.special = {cfg.gpt.start_text_token, cfg.gpt.stop_text_token}
        self.decoder = OrtDecoder.from_manifest(self.export_dir, manifest, threads=threads or None,
                                                spinning=spin_decoder)
        voc = manifest.component("vocoder")
        ctx = voc.extra.get("stream_context_frames") or {}
        self.vocoder_context = (int(ctx.get("left", 0)), int(ctx.get("right", 0)))  #: chunked streaming's
        self.voc_names = [t.name for t in voc.inputs]
        self.voc_dim = int(voc.extra.get("gpt_dim", voc.inputs[0].shape[-1]))
        self.spk_dim = int(voc.extra.get("speaker_embedding_dim", voc.inputs[1].shape[1]))
        self.samples_per_latent = int(voc.extra["samples_per_latent"])
        self.sample_rate = int(voc.extra.get("sample_rate", manifest.model.get("sampling_rate", 24000)))
        self.vocoder = session(self.export_dir / voc.file, threads or None, spinning=spin_leaves)
        self.model_dim = int(self.decoder.prefill_comp.extra["model_dim"])
        self.reps, self.warmup, self.gap_s = reps, warmup, gap_s
        self.rng = np.random.default_rng(seed)

    def _time(self, fn: Callable[[], object]) -> float:
        return _best_time(fn, self.reps, self.warmup, self.gap_s)

    def segment_ids(self, text: str, max_text_tokens_per_segment: int) -> list[list[int]]:
        """Each segment's text ids as the decoder gets them (start/stop removed; OrtDecoder adds them)."""
        segs = self.frontend.prepare(text, max_text_tokens_per_segment=max_text_tokens_per_segment)
        return [[i for i in s.token_ids if i not in self.special] for s in segs]

    def preprocess(self, text: str, max_text_tokens_per_segment: int) -> float:
        return self._time(lambda: self.frontend.prepare(text, max_text_tokens_per_segment=max_text_tokens_per_segment))

    def _conds(self, batch: int = 1) -> np.ndarray:
        return (0.5 * self.rng.standard_normal((batch, self.decoder.cond_rows, self.model_dim))).astype(np.float32)

    def prefill_and_latents(self, ids: Sequence[int], codes: int) -> tuple[float, float]:
        """(prefill s, latent pass s) of one segment alone."""
        conds = self._conds()
        prefill = self._time(lambda: self.decoder.prefill(conds, [list(ids)]))
        if codes < 1:
            return prefill, 0.0
        _, hidden, prefix = self.decoder.prefill(conds, [list(ids)])
        tokens = [[int(t) for t in self.rng.integers(0, self.decoder.start_mel, codes)]]
        latents = self._time(lambda: self.decoder.latents_after_prefix(prefix, hidden, tokens))
        return prefill, latents

    def steps(self, batches: Sequence[int], past: int) -> dict[int, float]:
        """Seconds per decode step (one new token per row) at each batch size, KV length `past`."""
        from export.runtime import KVState

        dec = self.decoder
        widest = max(batches)
        shape = (widest, dec.heads, past, dec.head_dim)
        kv = [((0.5 * self.rng.standard_normal(shape)).astype(np.float32),
               (0.5 * self.rng.standard_normal(shape)).astype(np.float32)) for _ in range(dec.layers)]
        out = {}
        for b in sorted(set(batches)):
            state = KVState([(k[:b], v[:b]) for k, v in kv], np.ones((b, past), bool))
            tok = self.rng.integers(0, dec.start_mel, (b, 1)).astype(np.int64)
            pos = np.full((b, 1), dec.first_position + past // 2, np.int64)
            out[b] = self._time(lambda s=state, t=tok, p=pos: dec.decode(t, p, s))
        return out

    def vocoder_call(self, frames: int) -> float:
        """Seconds of one vocoder call on `frames` latent frames, batch 1."""
        frames = max(1, frames)
        feeds = {self.voc_names[0]: (0.5 * self.rng.standard_normal((1, frames, self.voc_dim))).astype(np.float32),
                 self.voc_names[1]: (0.5 * self.rng.standard_normal((1, self.spk_dim, 1))).astype(np.float32)}
        return self._time(lambda: self.vocoder.run(None, feeds))

    def vocoder_fit(self, frames: Sequence[int]) -> tuple[float, float]:
        """(fixed s per call, s per frame) from calls at the smallest and the largest of `frames`."""
        sizes = sorted({max(1, f) for f in frames})
        if not sizes:
            return float("nan"), float("nan")
        return fit_linear({f: self.vocoder_call(f) for f in {sizes[0], sizes[-1]}})
