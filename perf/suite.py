"""The serving benchmark suite, one command: preset -> export -> repository -> server -> scenarios -> report.

Phases, in this order so that nothing measured shares the CPU with anything else measured:
1. machine facts, the model (a preset), its export (a no-op when up to date) and the Triton repositories;
2. engine_ref (PyTorch) on the same texts and voices, greedy: time to first segment, total, audio, decode and
   vocoder time — the median of `engine_ref_reps` after one warm-up call per request; then it is freed;
3. the fp32 server: warm-up (every request once), then per scenario and concurrency a closed-loop level of our
   async client on `tts` with Triton's per-model statistics and our metrics before/after, and the decoder's batch
   sampled from the metrics endpoint every `batch_sample_s`; the first segment of multi-segment requests alone;
   perf_analyzer levels (streaming `tts`, internal models as composing models); cancellation under load (streams
   cancelled at their first chunk beside a full load, timed to the decoder freeing the sequence and to the server
   closing the request); the soak with the server's resident memory;
4. the parts of one request alone (perf/parts.py) through ORT sessions on the same graphs, with no server running,
   and from them each level's sum-of-parts ceiling;
5. each weight-only decoder variant on its own server, single stream;
6. the floors (decode: decoder weight bytes / measured read bandwidth; vocoder: FLOPs per audio second / measured
   GEMM rate) and the report (perf/report.py).
Every served figure is given as a ratio to engine_ref or to the ceiling measured in the same run; numbers from
different runs are never combined.
"""

from __future__ import annotations

import gc
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine_ref.errors import InputError

__all__ = ["Scenario", "SuiteConfig", "suite_config", "RefItem", "FirstSegment", "VariantRun", "SuiteResult",
           "run_suite", "scenario_texts", "PRESETS"]

PRESETS = ("tiny", "v1.5")

SHORT_TEXTS = ("Hello there, friend.", "See you at noon!", "Thanks a lot.")
MEDIUM_TEXTS = (
    "The morning train was late again, so Maria read her book and watched the fields roll slowly past.",
    "Please remember to water the tomatoes on Tuesday, and close the garden gate before the dog escapes.",
)
LONG_TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night, the keeper "
    "climbed the narrow stairs, trimmed the wick, and watched the beam sweep across the dark water. Ships passed "
    "far out at sea, their lights small and steady, and none of them knew his name. In winter the wind pressed "
    "against the windows so hard that the glass hummed, and the keeper wrapped himself in two coats and drank his "
    "tea beside the lamp. In summer the evenings were long and gold, and children from the village came up the "
    "path to ask him questions. How far can the light be seen? What happens if it goes out? Have you ever seen a "
    "whale? He answered each one patiently. The light could be seen for twenty miles on a clear night. If it went "
    "out, he said, someone would notice, and that someone was usually him. And yes, once, he had seen a whale, "
    "rising slow and grey beneath the full moon, breathing like a tired giant. When the lighthouse was finally "
    "automated, he moved to a small house in the village, but he still walked to the cliff every evening, just to "
    "make sure the light came on."
)


@dataclass(frozen=True)
class Scenario:
    """A set of texts of one size class, measured at each concurrency with a fixed number of requests."""

    name: str
    texts: tuple[str, ...]
    concurrency: tuple[int, ...]
    per_stream: int = 2  #: requests per level = max(min_requests, per_stream * concurrency)
    min_requests: int = 4

    def requests_at(self, concurrency: int) -> int:
        return max(self.min_requests, self.per_stream * concurrency)


def scenario_texts() -> dict[str, tuple[str, ...]]:
    return {"short": SHORT_TEXTS, "medium": MEDIUM_TEXTS, "long": (LONG_TEXT,)}


@dataclass(frozen=True)
class SuiteConfig:
    preset: str = "tiny"
    out_dir: Path = Path("perf/results")
    work_dir: Path = Path("build/bench/tiny")  #: model (tiny), repositories, server logs
    model_dir: Path | None = None  #: default: work_dir/model (tiny) or build/models/<preset>
    export_dir: Path | None = None  #: default: work_dir/export (tiny) or build/export-<preset>
    scenarios: tuple[Scenario, ...] = ()
    voices: tuple[float, ...] = (3.0, 5.0)  #: seconds of each generated reference voice
    warmup_rounds: int = 1  #: every request this many times before measuring
    engine_ref_reps: int = 3
    #: a warm-up call before every engine_ref request, or only before the first one of each voice (which also
    #: fills engine_ref's speaker cache, as the server's warm-up fills its own)
    engine_ref_warmup_each: bool = True
    first_segment_reps: int = 3
    soak_requests: int = 100
    soak_concurrency: int = 4
    soak_warmup: int = 10
    soak_scenario: str = "short"
    perf_analyzer: bool = True
    pa_scenario: str = "medium"
    pa_concurrency: tuple[int, ...] = (1, 4, 8)
    pa_request_count: int = 6
    pa_trials: int = 3
    pa_cache: Path = Path("build/tools")
    variants: tuple[str, ...] = ("int4",)  #: weight-only decoder variants served single-stream
    verify_export: bool = True
    max_sequences: int = 8
    threads: int = 0  #: ORT intra-op threads per session in the server (0: its default) and torch threads
    spin_threads: str = "all"  #: whose ORT threads busy-wait in the server (RepoOptions.spin_threads)
    timeout_s: float = 900.0
    #: extra tritonserver arguments (the report lists them). None by default: the 128 MiB Python-backend
    #: shared-memory pool the old BLS path needed against SIGSEGVs at concurrency 8 is not needed by the
    #: concurrent path (tiny preset, every scenario at concurrency 8 and 16, three rounds: no crash, no failure).
    server_args: tuple[str, ...] = ()
    batch_sample_s: float = 0.05  #: how often the decoder's batch gauges are scraped during a level
    parts: bool = True  #: time the parts of one request alone and derive each level's ceiling
    parts_reps: int = 5
    parts_warmup: int = 1
    cancel_victims: int = 6  #: streams cancelled at their first chunk (0: no cancellation level)
    cancel_concurrency: int = 8  #: streams in flight, the victim's included
    #: what the other streams send meanwhile: single-segment requests, so that the decoder's slots are not all
    #: taken by other requests' look-ahead segments and the victim is admitted at once
    cancel_load_scenario: str = "medium"
    #: the victim: the long text in short segments, sampled (temperature 1, top_k 0, top_p 1, seeded): on the random
    #: tiny weights its segments then run 80-180 codes instead of ~40 greedy, so the decoder still holds sequences
    #: of it when its first chunk arrives (greedy, the decoder had finished them: nothing left to free)
    cancel_segment_tokens: int = 24
    cancel_sampling: bool = True
    cancel_watch_s: float = 10.0
    command: str = ""
    notes: tuple[str, ...] = ()

    def resolved_model_dir(self) -> Path:
        if self.model_dir is not None:
            return self.model_dir
        return self.work_dir / "model" if self.preset == "tiny" else Path("build/models") / self.preset

    def resolved_export_dir(self) -> Path:
        if self.export_dir is not None:
            return self.export_dir
        return self.work_dir / "export" if self.preset == "tiny" else Path(f"build/export-{self.preset}")

    def scenario(self, name: str) -> Scenario | None:
        return next((s for s in self.scenarios if s.name == name), None)


def suite_config(preset: str = "tiny", **overrides) -> SuiteConfig:
    """The defaults for a preset: tiny runs everything in minutes; v1.5 is reduced to what a 2-core CPU can do
    in under an hour (fewer requests, concurrency up to 8, long texts single-stream) — the report says so."""
    if preset not in PRESETS:
        raise InputError(f"unknown bench preset '{preset}'", f"choose one of: {', '.join(PRESETS)}")
    texts = scenario_texts()
    if preset == "tiny":
        base = SuiteConfig(
            preset="tiny", work_dir=Path("build/bench/tiny"),
            scenarios=(Scenario("short", texts["short"], (1, 2, 4, 8, 16)),
                       Scenario("medium", texts["medium"], (1, 2, 4, 8, 16)),
                       Scenario("long", texts["long"], (1, 2, 4, 8, 16), per_stream=1, min_requests=2)),
        )
    else:
        base = SuiteConfig(
            preset=preset, work_dir=Path(f"build/bench/{preset}"),
            scenarios=(Scenario("short", texts["short"][:1], (1, 4, 8), per_stream=1, min_requests=1),
                       Scenario("medium", texts["medium"][:1], (1, 4, 8), per_stream=1, min_requests=1),
                       Scenario("long", texts["long"], (1,), per_stream=1, min_requests=1)),
            voices=(3.0,), engine_ref_reps=1, engine_ref_warmup_each=False, first_segment_reps=1,
            soak_requests=12, soak_concurrency=4, soak_warmup=4,
            pa_scenario="short", pa_concurrency=(1,), pa_request_count=1, pa_trials=3, verify_export=False,
            parts_reps=3, cancel_victims=2, cancel_concurrency=4, cancel_load_scenario="short",
            notes=("reduced configuration for a 2-core CPU (one v1.5 request takes ~13 s served, ~30 s in "
                   "engine_ref): one text and one voice per scenario, one measured request per level (c at "
                   "concurrency c), long texts single-stream, engine_ref once per request after one warm-up call, "
                   "perf_analyzer 3 windows x 1 request at concurrency 1, 2 cancellations at concurrency 4, soak of "
                   "12 requests at concurrency 4 (the 100-request soak runs on the tiny preset)",),
        )
    return replace(base, **overrides)


# --------------------------------------------------------------------------------------------------- result types


@dataclass
class RefItem:
    """engine_ref on one request (median over repetitions)."""

    scenario: str
    text_index: int
    voice: str
    chars: int
    segments: int
    first_segment_s: float
    total_s: float
    audio_s: float
    tokens: int
    generate_s: float
    vocoder_s: float

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s if self.audio_s else float("nan")


@dataclass
class FirstSegment:
    """Served: a multi-segment request's time to first audio vs its first segment sent alone (single stream)."""

    scenario: str
    text_index: int
    ttfa_s: float  #: median time to first audio of the whole request
    alone_s: float  #: median latency of its first segment as a request of its own
    same_codes: bool  #: the first segment decoded to as many codes both ways (same work)


@dataclass
class VariantRun:
    precision: str
    levels: list = field(default_factory=list)  #: LevelSummary per scenario at concurrency 1
    error: str | None = None


@dataclass
class SuiteResult:
    config: SuiteConfig
    machine: dict
    ref: list[RefItem] = field(default_factory=list)
    levels: list = field(default_factory=list)  #: LevelSummary per (scenario, concurrency)
    model_times: dict = field(default_factory=dict)  #: "scenario@c" -> [ModelTime]
    first_segment: list[FirstSegment] = field(default_factory=list)
    pa: list = field(default_factory=list)  #: PaResult per concurrency
    pa_error: str | None = None
    soak: object | None = None  #: MemoryCheck
    soak_series: list = field(default_factory=list)  #: [(request index, MiB)]
    soak_level: object | None = None  #: LevelSummary of the soak
    variants: list[VariantRun] = field(default_factory=list)
    floors: dict = field(default_factory=dict)
    served_tokens: dict = field(default_factory=dict)  #: "scenario@1" -> effective ms per generated token
    level_tokens: dict = field(default_factory=dict)  #: "scenario@c" -> tokens the decoder generated in the level
    batch: dict = field(default_factory=dict)  #: "scenario@c" -> BatchSummary
    batch_series: dict = field(default_factory=dict)  #: "scenario@c" -> [(s since start, rows or None, active)]
    work: dict = field(default_factory=dict)  #: scenario -> [RequestWork] (per text, from the warm-up)
    parts: dict = field(default_factory=dict)  #: scenario -> ScenarioParts
    ceilings: dict = field(default_factory=dict)  #: "scenario@c" -> Ceiling
    parts_error: str | None = None
    cancel: object | None = None  #: CancelSummary
    cancel_records: list = field(default_factory=list)  #: CancelRecord per victim
    cancel_error: str | None = None
    scrape_s: list = field(default_factory=list)  #: how long each metrics scrape of the levels took
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  #: phase -> seconds


# -------------------------------------------------------------------------------------------------------- phases


def _say(msg: str) -> float:
    print(f"==> {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _voices(cfg: SuiteConfig) -> dict[str, bytes]:
    from engine_ref.audio import wav_bytes
    from engine_ref.indextts.presets import demo_voice

    return {f"voice{i}-{sec:g}s": wav_bytes(demo_voice(seconds=sec, seed=i), 24000) for i, sec in enumerate(cfg.voices)}


def _items(cfg: SuiteConfig, voices: dict[str, bytes]):
    """Per scenario: the (text, voice) requests, voices assigned round-robin."""
    from client.request import GenerationOverrides, TTSRequest
    from perf.loadgen import LoadRequest

    greedy = GenerationOverrides(do_sample=False, num_beams=1, seed=0)
    names = list(voices)
    out = {}
    for sc in cfg.scenarios:
        out[sc.name] = [
            LoadRequest(sc.name, TTSRequest.build(text, voices[names[i % len(names)]], params=greedy),
                        names[i % len(names)])
            for i, text in enumerate(sc.texts)
        ]
    return out


def ensure_model(cfg: SuiteConfig) -> Path:
    from engine_ref.indextts.presets import write_preset

    model_dir = cfg.resolved_model_dir()
    if not (model_dir / "config.yaml").is_file():
        _say(f"writing preset {cfg.preset} to {model_dir} (once; v1.5 takes minutes and several GB)")
        write_preset(cfg.preset, model_dir)
    return model_dir


def ensure_export(cfg: SuiteConfig, model_dir: Path) -> Path:
    from export.common import ExportOptions
    from export.pipeline import ExportRequest, run_export

    export_dir = cfg.resolved_export_dir()
    _, exported = run_export(ExportRequest(str(model_dir), export_dir, precisions=("fp32", *cfg.variants),
                                           options=ExportOptions(verify=cfg.verify_export)))
    print(f"    export {'written' if exported else 'up to date'}: {export_dir}", file=sys.stderr)
    return export_dir


def vocoder_flops_per_audio_s(synth, voice: bytes, frames: int = 24) -> float:
    """FLOPs (convolutions and matmuls, as torch counts them) BigVGAN spends per second of audio."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    spk = synth.speaker(voice)[0].speaker_embedding
    latents = torch.randn(1, frames, synth.model.config.bigvgan.gpt_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        synth.model.bigvgan.decode(latents, spk)
    return counter.get_total_flops() / (frames * synth.model.config.bigvgan.hop_length / synth.sample_rate)


def run_engine_ref(cfg: SuiteConfig, model_dir: Path, items: dict, voices: dict[str, bytes]) -> tuple[list[RefItem], float]:
    """engine_ref on every request (medians), and the vocoder's FLOPs per audio second."""
    import torch

    from engine_ref.sampling import GenerationParams
    from engine_ref.indextts.synthesizer import Synthesizer, Timings

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    synth = Synthesizer.from_pretrained(model_dir)
    params = GenerationParams.greedy(seed=0)
    out = []
    warmed: set[str] = set()
    for name, reqs in items.items():
        for i, item in enumerate(reqs):
            voice = voices[item.voice]
            text = item.request.text
            runs = []
            warm = cfg.engine_ref_warmup_each or item.voice not in warmed
            warmed.add(item.voice)
            for rep in range(0 if warm else 1, 1 + cfg.engine_ref_reps):  # rep 0: the warm-up call, not kept
                timings = Timings()
                t0 = time.perf_counter()
                first, segments, samples = None, 0, 0
                for seg in synth.stream(text, voice, params, timings=timings):
                    if first is None and seg.pcm16.size:
                        first = time.perf_counter() - t0
                    segments += 1
                    samples += seg.pcm16.size
                total = time.perf_counter() - t0
                if rep:
                    runs.append((first or total, total, samples / synth.sample_rate, timings))
            med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
            out.append(RefItem(
                scenario=name, text_index=i, voice=item.voice, chars=len(text), segments=segments,
                first_segment_s=med(0), total_s=med(1), audio_s=med(2), tokens=runs[0][3].tokens,
                generate_s=statistics.median(r[3].generate_s for r in runs),
                vocoder_s=statistics.median(r[3].vocoder_s for r in runs),
            ))
            print(f"    engine_ref {name}[{i}]: {out[-1].total_s:.2f} s for {out[-1].audio_s:.2f} s of audio "
                  f"(RTF {out[-1].rtf:.3f})", file=sys.stderr)
    flops = vocoder_flops_per_audio_s(synth, next(iter(voices.values())))
    del synth
    gc.collect()
    return out, flops


def _repo(cfg: SuiteConfig, export_dir: Path, precision: str) -> Path:
    from model_repository.builder import RepoOptions, build_repository

    opts = RepoOptions(max_sequences=cfg.max_sequences, decoder_precision=precision, threads=cfg.threads,
                       spin_threads=cfg.spin_threads)
    return build_repository(export_dir, cfg.work_dir / f"repo-{precision}", opts)


class Served:
    """A tritonserver over one repository that is restarted (and warmed up again) if it dies, so one crash costs
    one level's numbers, not the rest of the run; every restart is written into the report's notes."""

    def __init__(self, cfg: SuiteConfig, repo: Path, items: dict, result: SuiteResult):
        self.cfg, self.repo, self.items, self.result = cfg, repo, items, result
        self.server = None
        self.warm: dict = {}
        self.restarts = 0

    def start(self) -> "Served":
        from model_repository.server import ServerConfig, TritonServer, free_port
        from perf.loadgen import LoadTarget, run_requests

        self.server = TritonServer(ServerConfig(self.repo, free_port(), free_port(), free_port(),
                                                extra_args=list(self.cfg.server_args))).start(timeout_s=600)
        target = LoadTarget(self.server.grpc_url, timeout_s=self.cfg.timeout_s)
        for _ in range(self.cfg.warmup_rounds):
            for name, reqs in self.items.items():
                for i, outcome in enumerate(run_requests(target, reqs)):
                    if outcome.record.error:
                        raise InputError(f"warm-up request {name}[{i}] failed: {outcome.record.error}",
                                         f"see {self.server.log_path}")
                    self.warm[(name, i)] = outcome
        return self

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.process is not None and self.server.process.poll() is None

    def check(self, where: str, suspect: bool = False) -> bool:
        """True if the server survived `where`; otherwise note it, restart, and return False. `suspect`: requests
        failed, so give a dying process a moment to be seen dead."""
        deadline = time.perf_counter() + (3.0 if suspect else 0.0)
        while self.alive and time.perf_counter() < deadline:
            time.sleep(0.1)
        if self.alive:
            return True
        status = self.server.process.returncode if self.server and self.server.process else "?"
        log = self.server.log_path if self.server else "?"
        self.result.notes.append(f"tritonserver died during {where} (exit status {status}; log {log}); restarted")
        print(f"    tritonserver died during {where} (status {status}); restarting", file=sys.stderr)
        self.stop()
        self.restarts += 1
        self.start()
        return False

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            _reap_stubs(self.repo)

    def __enter__(self) -> "Served":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reap_stubs(repo: Path) -> None:
    """Python-backend stubs of this repository orphaned by a crashed server keep running (and holding memory):
    end them."""
    import psutil

    marker = str(Path(repo).resolve())
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("triton_python_backend_stub") and any(marker in a for a in cmd[1:2]):
            try:
                p.kill()
            except psutil.Error:
                pass


def _stats(served: Served) -> dict:
    from perf.loadgen import server_statistics

    try:
        return server_statistics(served.server.grpc_url)
    except Exception:  # a dead server has no statistics; the level's failures say why
        return {}


def _levels(cfg: SuiteConfig, served: Served, items: dict, result: SuiteResult, single_stream: bool = False,
            label: str = "fp32") -> list:
    from perf.loadgen import LoadTarget, MetricsSampler, run_level
    from perf.stats import batch_summary, model_stats_delta, summarize_level

    out = []
    for sc in cfg.scenarios:
        for conc in ((1,) if single_stream else sc.concurrency):
            count = sc.requests_at(conc)
            target = LoadTarget(served.server.grpc_url, timeout_s=cfg.timeout_s)
            before = _stats(served)
            sampler = MetricsSampler(served.server.metrics_url, cfg.batch_sample_s)
            if single_stream:  # the variants' single stream: only the token counter, at both ends
                sampler.sample()
                outcomes = run_level(target, items[sc.name], conc, count)
                sampler.sample()
            else:
                with sampler:
                    outcomes = run_level(target, items[sc.name], conc, count)
            after = _stats(served)
            level = summarize_level([o.record for o in outcomes], sc.name, conc)
            out.append(level)
            key = f"{sc.name}@{conc}"
            samples = sampler.samples
            tokens = (samples[-1][1].get("tts_generated_tokens_total", 0.0)
                      - samples[0][1].get("tts_generated_tokens_total", 0.0)) if len(samples) >= 2 else math.nan
            if not single_stream:
                result.model_times[key] = model_stats_delta(before, after)
                result.level_tokens[key] = tokens
                result.batch[key] = batch_summary(samples)
                result.batch_series[key] = _series(samples)
                result.scrape_s += sampler.scrape_s
                if conc == 1 and tokens > 0:
                    result.served_tokens[f"{sc.name}@1"] = 1e3 * level.wall_s / tokens
            b = result.batch.get(key) if not single_stream else None
            print(f"    {label} {sc.name} c={conc}: {level.requests} req, TTFA p50 {level.ttfa_s.p50:.3f} s, latency "
                  f"p50 {level.latency_s.p50:.3f} s, RTF p50 {level.rtf.p50:.3f}, {level.audio_per_wall:.2f} audio s/s"
                  + (f", decoder rows/step {b.rows_per_step:.2f} (max {b.rows_max:g})" if b else "")
                  + (f", {level.failed} failed: {level.errors[0][:120]}" if level.failed else ""), file=sys.stderr)
            served.check(f"{label} level {sc.name} c={conc}", suspect=level.failed > 0)
    return out


def _series(samples: list) -> list[tuple[float, float | None, float]]:
    """(seconds since the level started, rows of the step that ran since the previous sample or None when none
    ran, live sequences) per sample."""
    out = []
    for (_, prev), (t, cur) in zip(samples, samples[1:]):
        stepped = cur.get("tts_decoder_steps_total", 0.0) > prev.get("tts_decoder_steps_total", 0.0)
        out.append((round(t, 4), cur.get("tts_decoder_batch_rows") if stepped else None,
                    cur.get("tts_decoder_active_sequences", math.nan)))
    return out


def _first_segments(cfg: SuiteConfig, served: Served, items: dict) -> list[FirstSegment]:
    """TTFA of multi-segment requests vs their first segment alone, both single stream, medians of reps."""
    from client.request import TTSRequest
    from perf.loadgen import LoadRequest, LoadTarget, run_requests

    out = []
    for name, reqs in items.items():
        for i, item in enumerate(reqs):
            outcome = served.warm.get((name, i))
            if outcome is None or outcome.record.segments < 2 or not outcome.first_segment_text:
                continue
            alone = LoadRequest(name, TTSRequest(outcome.first_segment_text, item.request.reference_audio,
                                                 params=item.request.params), item.voice)
            target = LoadTarget(served.server.grpc_url, timeout_s=cfg.timeout_s)
            full_runs = run_requests(target, [item] * cfg.first_segment_reps)
            alone_runs = run_requests(target, [alone] * cfg.first_segment_reps)
            ttfa = statistics.median(o.record.first_audio_s or math.nan for o in full_runs)
            alone_s = statistics.median(o.record.total_s if o.record.ok else math.nan for o in alone_runs)
            same = bool(alone_runs[0].segment_codes) and alone_runs[0].segment_codes[0] == outcome.segment_codes[0]
            out.append(FirstSegment(name, i, ttfa, alone_s, same))
            print(f"    {name}[{i}]: TTFA {ttfa:.3f} s vs first segment alone {alone_s:.3f} s", file=sys.stderr)
            served.check(f"first-segment check {name}[{i}]",
                         suspect=not all(o.record.ok for o in (*full_runs, *alone_runs)))
    return out


def _perf_analyzer(cfg: SuiteConfig, served: Served, items: dict, stem_dir: Path, result: SuiteResult) -> None:
    import json

    from model_repository import contract as c
    from perf.analyzer import PaSettings, ensure_perf_analyzer, input_data, run_perf_analyzer

    scenario = cfg.pa_scenario if cfg.pa_scenario in items else next(iter(items))
    pa = ensure_perf_analyzer(cfg.pa_cache)
    stem_dir.mkdir(parents=True, exist_ok=True)
    data = stem_dir / "input_data.json"
    data.write_text(json.dumps(input_data([it.request.arrays() for it in items[scenario]])))
    composing = [f"{model}:{version}" for model, version in _loaded_versions(served).items()]
    settings = PaSettings(cfg.pa_request_count, cfg.pa_trials, timeout_s=cfg.timeout_s)
    for conc in cfg.pa_concurrency:
        res = run_perf_analyzer(pa, url=served.server.grpc_url, model=c.STREAM_MODEL, input_json=data,
                                concurrency=conc, out_dir=stem_dir, composing=composing, settings=settings)
        result.pa.append(res)
        if not served.check(f"perf_analyzer c={conc}", suspect=res.error is not None) and not res.error:
            res.error = "tritonserver died during this level"
        if res.error:
            print(f"    perf_analyzer c={conc}: {res.error}", file=sys.stderr)
        else:
            print(f"    perf_analyzer c={conc}: {res.row.get('Inferences/Second', math.nan):.2f} infer/s, first "
                  f"response p50 {res.row.get('p50 latency', math.nan) / 1e3:.0f} ms", file=sys.stderr)


def _loaded_versions(served: Served) -> dict[str, str]:
    """The internal models and their ready versions, as perf_analyzer's --bls-composing-models wants them.
    From the server's repository index (a restricted API: TritonServer.model_states sends the admin header);
    the repository on disk when the index does not answer."""
    from model_repository import contract as c

    internal = (c.PREPROCESS, c.COND_ENCODER, c.DECODER, c.VOCODER)
    ready = {m.get("name"): str(m.get("version", "")) for m in served.server.model_states()
             if m.get("state") == "READY" and m.get("version")}
    out = {}
    for model in internal:
        if ready.get(model):
            out[model] = ready[model]
        else:
            versions = sorted(int(p.name) for p in (served.repo / model).iterdir() if p.name.isdigit())
            out[model] = str(versions[-1])
    return out


def _cancellation(cfg: SuiteConfig, served: Served, items: dict, voices: dict[str, bytes],
                  result: SuiteResult) -> None:
    """Streams cancelled at their first chunk while `cancel_concurrency - 1` others keep the server busy."""
    from client.request import GenerationOverrides, TTSRequest
    from perf.loadgen import LoadRequest, LoadTarget, run_cancel_level
    from perf.stats import cancel_summary

    load = items.get(cfg.cancel_load_scenario) or next(iter(items.values()))
    voice = next(iter(voices))
    params = (GenerationOverrides(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1, seed=0)
              if cfg.cancel_sampling else GenerationOverrides(do_sample=False, num_beams=1, seed=0))
    victim = LoadRequest("cancel", TTSRequest.build(LONG_TEXT, voices[voice], params=params,
                                                    max_text_tokens_per_segment=cfg.cancel_segment_tokens), voice)
    target = LoadTarget(served.server.grpc_url, timeout_s=cfg.timeout_s)
    run = run_cancel_level(target, load, victim, cfg.cancel_concurrency, cfg.cancel_victims,
                           served.server.metrics_url, cfg.cancel_watch_s)
    result.cancel_records = run.records
    result.cancel = s = cancel_summary(run.records, run.load, cfg.cancel_concurrency, run.poll_s)
    served.check("cancellation level", suspect=s.failed > 0 or s.load_failed > 0)
    print(f"    cancel at c={cfg.cancel_concurrency}: {s.victims} victims, freed in the decoder p50 "
          f"{s.to_decoder_s.p50 * 1e3:.0f} ms (max {s.to_decoder_s.max * 1e3:.0f}), closed p50 "
          f"{s.to_closed_s.p50 * 1e3:.0f} ms (max {s.to_closed_s.max * 1e3:.0f}); {s.failed} not closed, "
          f"{s.load_failed}/{s.load_requests} load requests failed", file=sys.stderr)


def _request_work(timer, sc_name: str, index: int, text: str, outcome, max_tokens: int,
                  notes: list[str]):
    """One request as the server decoded it (its warm-up outcome): segments, codes, audio, vocoder calls."""
    from perf.parts import RequestWork, SegmentWork, vocoded_frames

    ids = timer.segment_ids(text, max_tokens)
    codes = list(outcome.segment_codes)
    if len(ids) != len(codes):
        notes.append(f"parts: {sc_name}[{index}] has {len(ids)} segments here, {len(codes)} served; matched in order")
    frames_s = timer.samples_per_latent / timer.sample_rate
    scale = outcome.record.audio_s / max(1e-9, sum(codes) * frames_s)  # segment audio from its codes
    segs = tuple(SegmentWork(len(ids[min(k, len(ids) - 1)]), n, n * frames_s * scale) for k, n in enumerate(codes))
    left, right = timer.vocoder_context
    calls = tuple(vocoded_frames(ch.start, ch.start + ch.codes, ch.available, left, right)
                  for ch in outcome.chunks if ch.codes > 0)
    return RequestWork(sc_name, index, segs, calls), ids


def _parts(cfg: SuiteConfig, export_dir: Path, served: Served, items: dict, result: SuiteResult) -> None:
    """Every scenario's requests as the server decoded them (warm-up outcomes), their parts timed alone, and
    each measured level's ceiling (perf/parts.py)."""
    from model_repository.builder import RepoOptions
    from perf.parts import PartsTimer, ScenarioParts, ceiling

    repo_opts = RepoOptions()
    max_tokens = repo_opts.max_text_tokens_per_segment
    timer = PartsTimer(export_dir, cfg.threads or None, spin_decoder=cfg.spin_threads != "none",
                       spin_leaves=cfg.spin_threads == "all", reps=cfg.parts_reps, warmup=cfg.parts_warmup)
    works: dict[str, list] = {}
    ids: dict[tuple[str, int], list] = {}
    for sc in cfg.scenarios:
        for i, item in enumerate(items[sc.name]):
            outcome = served.warm.get((sc.name, i))
            if outcome is not None and outcome.record.ok and outcome.segment_codes:
                work, ids[(sc.name, i)] = _request_work(timer, sc.name, i, item.request.text, outcome, max_tokens,
                                                        result.notes)
                works.setdefault(sc.name, []).append(work)
    if not works:
        raise InputError("no warm-up request produced audio", "see the server log")
    fixed, per_frame = timer.vocoder_fit([f for ws in works.values() for w in ws for f in w.vocoder_frames])
    frames_per_audio_s = timer.sample_rate / timer.samples_per_latent
    for sc in cfg.scenarios:
        if sc.name not in works:
            continue
        ws = works[sc.name]
        parts = ScenarioParts(sc.name, vocoder_fixed_s=fixed, vocoder_s_per_frame=per_frame,
                              vocoder_s_per_audio_s=per_frame * frames_per_audio_s)
        pasts = []
        for w in ws:
            text = items[sc.name][w.text_index].request.text
            seg_ids = ids[(sc.name, w.text_index)]
            parts.preprocess_s[w.text_index] = timer.preprocess(text, max_tokens)
            pl = [timer.prefill_and_latents(seg_ids[min(k, len(seg_ids) - 1)], seg.codes)
                  for k, seg in enumerate(w.segments)]
            parts.prefill_s[w.text_index] = [p for p, _ in pl]
            parts.latents_s[w.text_index] = [lat for _, lat in pl]
            pasts += [timer.decoder.cond_rows + seg.text_ids + 2 + seg.codes // 2 for seg in w.segments]
        result.work[sc.name] = ws
        c1 = min(sc.concurrency)
        lv1 = next((lv for lv in result.levels if lv.scenario == sc.name and lv.concurrency == c1), None)
        if lv1 is not None and result.level_tokens.get(f"{sc.name}@{c1}", 0) > 0:
            codes = sum(ws[k % len(ws)].codes for k in range(lv1.requests))
            parts.tokens_per_code = result.level_tokens[f"{sc.name}@{c1}"] / max(1, codes)
        segs = max(1, round(statistics.median(len(w.segments) for w in ws)))
        batches = sorted({min(cfg.max_sequences, c * min(segs, repo_opts.segments_in_flight)) for c in sc.concurrency})
        parts.step_past = int(round(statistics.mean(pasts)))
        parts.step_s = timer.steps(batches, parts.step_past)
        result.parts[sc.name] = parts
        for lv in result.levels:
            if lv.scenario != sc.name:
                continue
            reqs = [ws[k % len(ws)] for k in range(lv.requests)]
            ceil = ceiling(reqs, parts, lv.concurrency, cfg.max_sequences, repo_opts.segments_in_flight)
            result.ceilings[f"{sc.name}@{lv.concurrency}"] = ceil
            print(f"    ceiling {sc.name} c={lv.concurrency}: {ceil.audio_per_wall:.2f} audio s/s (batch {ceil.batch}; "
                  f"serial parts {ceil.serial_s:.3f} s + decode {ceil.decode_s:.3f} s for {ceil.audio_s:.2f} s); "
                  f"measured {lv.audio_per_wall:.2f}", file=sys.stderr)


def _soak(cfg: SuiteConfig, served: Served, items: dict, result: SuiteResult) -> None:
    from perf.loadgen import LoadTarget, RssSampler, run_level
    from perf.stats import memory_check, summarize_level

    scenario = cfg.soak_scenario if cfg.soak_scenario in items else next(iter(items))
    server = served.server
    target = LoadTarget(server.grpc_url, timeout_s=cfg.timeout_s)
    series: list[tuple[int, float]] = []
    with RssSampler(server.process.pid, interval_s=1.0) as sampler:
        def on_done(index: int, _outcome) -> None:
            series.append((len(series) + 1, sampler.sample()))

        outcomes = run_level(target, items[scenario], cfg.soak_concurrency, cfg.soak_requests, on_done)
    result.soak_series = series
    result.soak_level = summarize_level([o.record for o in outcomes[cfg.soak_warmup:]], f"soak-{scenario}",
                                        cfg.soak_concurrency)
    result.soak = memory_check([mb for _, mb in series], cfg.soak_warmup)
    served.check("soak")
    s = result.soak
    print(f"    soak: {len(series)} requests, RSS {s.baseline_mb:.0f} -> {s.final_mb:.0f} MiB (max {s.max_mb:.0f}, "
          f"drift {100 * s.drift:+.1f} %)", file=sys.stderr)


def _floors(cfg: SuiteConfig, export_dir: Path, vocoder_flops: float) -> dict:
    """Decode floor per decoder precision (weight bytes / read bandwidth) and the vocoder's FLOPs per audio
    second against this CPU's GEMM rate, both measured now with the benchmark's thread count."""
    import torch

    from export.manifest import read_manifest
    from perf.export_bench import read_bandwidth, streamed_weight_bytes
    from perf.stats import decode_floor_ms, vocoder_floor_rtf

    threads = cfg.threads or torch.get_num_threads()
    bandwidth = max(read_bandwidth(threads, mib=256).values())
    manifest = read_manifest(export_dir)
    floors: dict = {"threads": threads, "bandwidth_gb_s": bandwidth / 1e9, "decode": {}}
    for precision in ("fp32", *cfg.variants):
        comp = manifest.component("gpt_decode", None if precision == "fp32" else precision)
        nbytes = streamed_weight_bytes(export_dir / comp.file)
        floors["decode"][precision] = {"weight_bytes": nbytes, "floor_ms": decode_floor_ms(nbytes, bandwidth)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        gemm = 2 * n ** 3 / statistics.median(times[1:])
    finally:
        torch.set_num_threads(before)
    floors.update(gemm_gflop_s=gemm / 1e9, vocoder_gflop_per_audio_s=vocoder_flops / 1e9,
                  vocoder_floor_rtf=vocoder_floor_rtf(vocoder_flops, gemm))
    return floors


def _variant(cfg: SuiteConfig, export_dir: Path, precision: str, items: dict, result: SuiteResult) -> VariantRun:
    run = VariantRun(precision)
    with Served(cfg, _repo(cfg, export_dir, precision), items, result) as served:
        run.levels = _levels(cfg, served, items, result, single_stream=True, label=precision)
    return run


def run_suite(cfg: SuiteConfig, stem: str | None = None) -> tuple[SuiteResult, Path]:
    """Everything, then the report; returns the result and the report's path."""
    from perf import report
    from perf.machine import load_average, machine_info

    started = time.perf_counter()
    report.check_plotting()  # fail before an hour of measuring, not after
    machine = machine_info(cfg.threads or 0, cfg.command or shlex.join(sys.argv))
    result = SuiteResult(cfg, machine, notes=list(cfg.notes))
    stem = stem or report.report_stem(cfg.preset, machine)
    phase = {}

    t = _say(f"model and export ({cfg.preset})")
    model_dir = ensure_model(cfg)
    export_dir = ensure_export(cfg, model_dir)
    repo = _repo(cfg, export_dir, "fp32")
    phase["prepare_s"] = time.perf_counter() - t
    voices = _voices(cfg)
    items = _items(cfg, voices)

    t = _say("engine_ref (PyTorch), greedy, same texts and voices")
    result.ref, vocoder_flops = run_engine_ref(cfg, model_dir, items, voices)
    phase["engine_ref_s"] = time.perf_counter() - t

    t = _say("tritonserver, fp32 decoder (start + warm-up)")
    with Served(cfg, repo, items, result) as served:
        phase["server_start_warmup_s"] = time.perf_counter() - t
        t = _say("load levels (our async gRPC client)")
        result.levels = _levels(cfg, served, items, result)
        result.first_segment = _first_segments(cfg, served, items)
        phase["client_s"] = time.perf_counter() - t
        if cfg.perf_analyzer:
            t = _say("perf_analyzer (streaming, composing models)")
            try:
                _perf_analyzer(cfg, served, items, cfg.out_dir / stem, result)
            except Exception as exc:  # the rest of the report stays useful; the failure is printed in it
                result.pa_error = str(exc)
                print(f"    perf_analyzer failed: {exc}", file=sys.stderr)
            phase["perf_analyzer_s"] = time.perf_counter() - t
        if cfg.cancel_victims > 0:
            t = _say(f"cancellation under load: {cfg.cancel_victims} streams cancelled at their first chunk, "
                     f"concurrency {cfg.cancel_concurrency}")
            try:
                _cancellation(cfg, served, items, voices, result)
            except Exception as exc:
                result.cancel_error = str(exc)
                print(f"    cancellation level failed: {exc}", file=sys.stderr)
            phase["cancel_s"] = time.perf_counter() - t
        t = _say(f"soak: {cfg.soak_requests} requests at concurrency {cfg.soak_concurrency}")
        _soak(cfg, served, items, result)
        phase["soak_s"] = time.perf_counter() - t
    if cfg.parts:
        t = _say("parts of one request alone (ORT sessions on the same graphs, no server) and the ceilings")
        try:
            _parts(cfg, export_dir, served, items, result)
        except Exception as exc:
            result.parts_error = str(exc)
            print(f"    parts failed: {exc}", file=sys.stderr)
        phase["parts_s"] = time.perf_counter() - t
    for precision in cfg.variants:
        t = _say(f"tritonserver, {precision} decoder, single stream")
        try:
            result.variants.append(_variant(cfg, export_dir, precision, items, result))
        except Exception as exc:
            result.variants.append(VariantRun(precision, error=str(exc)))
            print(f"    {precision} failed: {exc}", file=sys.stderr)
        phase[f"variant_{precision}_s"] = time.perf_counter() - t
    t = _say("floors: decode (bandwidth) and vocoder (FLOPs)")
    result.floors = _floors(cfg, export_dir, vocoder_flops)
    phase["floors_s"] = time.perf_counter() - t
    phase["total_s"] = time.perf_counter() - started
    result.timings = phase

    # Above the core count means something else competed for the CPU during the run: the figures are suspect.
    result.machine["load_avg_at_end"] = load_average()
    path = report.write_report(result, stem)
    return result, path
