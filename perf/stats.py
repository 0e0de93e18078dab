"""The arithmetic of the serving benchmark: percentiles, RTF, aggregate throughput, Triton statistics deltas,
memory drift and the physical floors — pure functions, so they are unit-tested apart from any server.

Conventions (every report uses them, so numbers compare run to run):
- percentiles interpolate linearly between order statistics (numpy's default), over successful requests only;
- RTF = wall seconds / audio seconds of one request (below 1: faster than real time);
- aggregate throughput = audio seconds of all measured requests / the wall window from the first send to the
  last finish (what a sizing decision needs: audio delivered per second of machine time);
- a ratio "served / engine_ref" is NaN when either side is missing or zero, never a misleading 0 or inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "percentile", "Distribution", "RequestRecord", "LevelSummary", "summarize_level", "ratio",
    "ModelTime", "model_stats_delta", "MemoryCheck", "memory_check", "decode_floor_ms", "vocoder_floor_rtf",
    "sequential_throughput", "BatchSummary", "batch_summary", "CancelSummary", "cancel_summary",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values (a missing figure, not zero)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan")
    return float(np.percentile(np.asarray(vals, dtype=np.float64), q))


@dataclass(frozen=True)
class Distribution:
    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Distribution":
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(len(vals), float(np.mean(vals)), percentile(vals, 50), percentile(vals, 90),
                   percentile(vals, 99), min(vals), max(vals))


def ratio(num: float | None, den: float | None) -> float:
    """num / den; NaN when undefined (missing, zero or non-finite) so no made-up speed-up reaches a report."""
    if num is None or den is None:
        return float("nan")
    num, den = float(num), float(den)
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return float("nan")
    return num / den


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it; times are seconds from its own send (perf_counter based)."""

    scenario: str
    concurrency: int
    sent_at: float  #: perf_counter at send (absolute; used for the wall window)
    total_s: float  #: send -> last audio chunk (the request's latency)
    first_audio_s: float | None  #: send -> first non-empty audio chunk
    audio_s: float
    segments: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.audio_s > 0

    @property
    def finished_at(self) -> float:
        return self.sent_at + self.total_s

    @property
    def rtf(self) -> float:
        return ratio(self.total_s, self.audio_s)


@dataclass(frozen=True)
class LevelSummary:
    """One (scenario, concurrency) level of the load test."""

    scenario: str
    concurrency: int
    requests: int
    failed: int
    ttfa_s: Distribution
    latency_s: Distribution
    rtf: Distribution
    audio_s: float  #: audio seconds delivered by the successful requests
    wall_s: float  #: first send -> last finish
    errors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def audio_per_wall(self) -> float:
        """Aggregate throughput: audio seconds per wall second (NaN when every request failed: not measured)."""
        return ratio(self.audio_s, self.wall_s) if self.requests > self.failed else float("nan")

    @property
    def requests_per_s(self) -> float:
        return ratio(self.requests - self.failed, self.wall_s)


def summarize_level(records: Sequence[RequestRecord], scenario: str | None = None,
                    concurrency: int | None = None) -> LevelSummary:
    """Statistics of one level's measured requests (warm-up requests must not be passed in)."""
    if not records:
        raise ValueError("no requests to summarize")
    ok = [r for r in records if r.ok]
    wall = max(r.finished_at for r in records) - min(r.sent_at for r in records)
    errors = tuple(sorted({r.error for r in records if r.error}))
    return LevelSummary(
        scenario=scenario or records[0].scenario, concurrency=concurrency or records[0].concurrency,
        requests=len(records), failed=len(records) - len(ok),
        ttfa_s=Distribution.of(r.first_audio_s for r in ok), latency_s=Distribution.of(r.total_s for r in ok),
        rtf=Distribution.of(r.rtf for r in ok), audio_s=sum(r.audio_s for r in ok), wall_s=wall, errors=errors,
    )


def sequential_throughput(audio_s: Sequence[float], compute_s: Sequence[float]) -> float:
    """Audio seconds per wall second when the same requests run one after another (engine_ref's baseline)."""
    return ratio(sum(audio_s), sum(compute_s))


# ------------------------------------------------------------------------------------- Triton's per-model statistics


@dataclass(frozen=True)
class ModelTime:
    """What one model did between two statistics snapshots (Triton's cumulative counters, differenced)."""

    model: str
    requests: int  #: successful inference requests
    executions: int  #: model executions (batches)
    queue_ms: float  #: mean time a request waited in the model's queue
    compute_ms: float  #: mean compute (input + infer + output) per request
    queue_total_s: float
    compute_total_s: float


def _stat_ns(stats: Mapping, key: str) -> tuple[int, int]:
    entry = stats.get("inference_stats", {}).get(key, {}) or {}
    return int(entry.get("count", 0) or 0), int(entry.get("ns", 0) or 0)


def _by_model(snapshot: Mapping) -> dict[str, Mapping]:
    return {m["name"]: m for m in snapshot.get("model_stats", []) if "name" in m}


def model_stats_delta(before: Mapping, after: Mapping) -> list[ModelTime]:
    """Per-model queue vs compute between two `get_inference_statistics(as_json=True)` snapshots.

    Decoupled models (tts, gpt_decoder) count their `execute` call only: their compute time is the time to
    enqueue, and the real work shows in the leaves they call and in the client's latency.
    """
    old = _by_model(before)
    out = []
    for name, stats in sorted(_by_model(after).items()):
        prev = old.get(name, {})
        n1, _ = _stat_ns(stats, "success")
        n0, _ = _stat_ns(prev, "success")
        requests = n1 - n0
        ex = int(stats.get("execution_count", 0) or 0) - int(prev.get("execution_count", 0) or 0)
        parts = {}
        for key in ("queue", "compute_input", "compute_infer", "compute_output"):
            parts[key] = _stat_ns(stats, key)[1] - _stat_ns(prev, key)[1]
        compute_ns = parts["compute_input"] + parts["compute_infer"] + parts["compute_output"]
        if requests <= 0 and ex <= 0:
            continue
        out.append(ModelTime(
            model=name, requests=requests, executions=ex,
            queue_ms=ratio(parts["queue"] / 1e6, requests), compute_ms=ratio(compute_ns / 1e6, requests),
            queue_total_s=parts["queue"] / 1e9, compute_total_s=compute_ns / 1e9,
        ))
    return out


# --------------------------------------------------------------------------------------------------- memory soak


@dataclass(frozen=True)
class MemoryCheck:
    baseline_mb: float  #: resident memory when warm-up ended
    final_mb: float
    max_mb: float
    drift: float  #: (max after warm-up - baseline) / baseline
    limit: float
    samples: int

    @property
    def ok(self) -> bool:
        return math.isfinite(self.drift) and self.drift <= self.limit


def memory_check(samples_mb: Sequence[float], warmup_samples: int, limit: float = 0.05) -> MemoryCheck:
    """Whether resident memory stayed within `limit` of its level at the end of warm-up.

    The baseline is the sample at the end of warm-up (model sessions, arenas and caches are allocated by then);
    growth after it is what a long-running server would accumulate.
    """
    if warmup_samples < 1:
        raise ValueError("warm-up must contain at least one sample")
    if len(samples_mb) <= warmup_samples:
        raise ValueError(f"{len(samples_mb)} memory samples; more than the {warmup_samples} warm-up ones are needed")
    baseline = float(samples_mb[warmup_samples - 1])
    after = [float(s) for s in samples_mb[warmup_samples:]]
    peak = max(after)
    return MemoryCheck(baseline, after[-1], peak, ratio(peak - baseline, baseline), limit, len(samples_mb))


# ------------------------------------------------------------------------------------------------ physical floors


def decode_floor_ms(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """The fastest a batch-1 decode step can be: every decoder weight byte streamed once at measured bandwidth."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    return 1e3 * weight_bytes / bandwidth_bytes_per_s


def vocoder_floor_rtf(flops_per_audio_s: float, flops_per_s: float) -> float:
    """The lowest vocoder RTF this machine allows: its FLOPs per audio second / the sustained FLOP rate."""
    if flops_per_s <= 0:
        raise ValueError("FLOP rate must be positive")
    return flops_per_audio_s / flops_per_s


# ---------------------------------------------------------------------------------------- decoder batch over time


@dataclass(frozen=True)
class BatchSummary:
    """The decoder's batch during one level, from metrics samples (MetricsSampler).

    `rows_*` count only samples after which a step ran (tts_decoder_steps_total moved since the previous sample):
    the rows gauge keeps its last value while the decoder idles. `rows_per_step` is exact over the whole level:
    tokens generated / steps run (one token per live sequence per step; rows = sequences under greedy decoding).
    """

    samples: int
    busy_fraction: float  #: share of sample intervals in which at least one step ran
    rows_mean: float
    rows_max: float
    active_mean: float  #: live sequences, every sample
    active_max: float
    steps: float
    rows_per_step: float


def batch_summary(samples: Sequence[tuple[float, Mapping[str, float]]]) -> BatchSummary:
    """Summary of [(t, {metric: value})] (the first sample is the level's start)."""
    nan = float("nan")
    if len(samples) < 2:
        return BatchSummary(len(samples), nan, nan, nan, nan, nan, nan, nan)
    rows, busy, active = [], 0, []
    for (_, prev), (_, cur) in zip(samples, samples[1:]):
        if cur.get("tts_decoder_steps_total", 0.0) > prev.get("tts_decoder_steps_total", 0.0):
            busy += 1
            rows.append(cur.get("tts_decoder_batch_rows", nan))
        active.append(cur.get("tts_decoder_active_sequences", nan))
    first, last = samples[0][1], samples[-1][1]
    steps = last.get("tts_decoder_steps_total", 0.0) - first.get("tts_decoder_steps_total", 0.0)
    tokens = last.get("tts_generated_tokens_total", 0.0) - first.get("tts_generated_tokens_total", 0.0)
    d_rows, d_active = Distribution.of(rows), Distribution.of(active)
    return BatchSummary(len(samples), busy / (len(samples) - 1), d_rows.mean, d_rows.max, d_active.mean,
                        d_active.max, steps, ratio(tokens, steps))


# ------------------------------------------------------------------------------------- cancellation under load


@dataclass(frozen=True)
class CancelSummary:
    concurrency: int
    victims: int
    failed: int  #: victims the server did not close in time (or that could not be cancelled)
    to_decoder_s: Distribution  #: client cancel -> decoder sequence freed
    to_closed_s: Distribution  #: client cancel -> request closed by the server
    without_live_sequence: int  #: closed, but no decoder sequence of theirs was live at the cancel
    load_requests: int
    load_failed: int
    resolution_s: float  #: median metrics scrape time while watching (how finely the times are resolved)
    first_chunk_s: Distribution | None = None  #: the victims' send -> first chunk (their TTFA under this load)


def cancel_summary(records: Sequence, load: Sequence, concurrency: int, poll_s: Sequence[float]) -> CancelSummary:
    """Summary of loadgen CancelRecords and the load requests that ran beside them (loadgen Outcomes)."""
    closed = [r for r in records if r.to_closed_s is not None]
    return CancelSummary(
        concurrency=concurrency, victims=len(records), failed=len(records) - len(closed),
        to_decoder_s=Distribution.of(r.to_decoder_s for r in records),
        to_closed_s=Distribution.of(r.to_closed_s for r in closed),
        without_live_sequence=sum(1 for r in closed if r.to_decoder_s is None),
        load_requests=len(load), load_failed=sum(1 for o in load if not o.record.ok),
        resolution_s=percentile(list(poll_s), 50), first_chunk_s=Distribution.of(r.first_chunk_s for r in records),
    )
