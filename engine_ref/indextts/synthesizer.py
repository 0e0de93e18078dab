"""The reference pipeline: text + reference audio + generation parameters -> 24 kHz PCM and timings.

Per call: normalize/tokenize/segment the text, condition on the reference (cached by the hash of its bytes in a
bounded LRU), decode each bucket of similar-length segments as one batch, run the teacher-forced latent pass,
vocode each segment and convert to 16-bit PCM exactly as upstream (clamp(32767 * wav) then truncate). Nothing
else outlives the call: each bucket's tensors are dropped as soon as its audio is produced.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch

from engine_ref.audio import audio_fingerprint, load_audio, to_pcm16
from engine_ref.beam_search import decode_beams
from engine_ref.cache import BoundedLRU
from engine_ref.errors import InputError
from engine_ref.generate import decode_sampling, generation_ids, latent_pass, remove_long_silence
from engine_ref.params import segment_seed
from engine_ref.indextts.loader import LoadedModel, load_model
from engine_ref.mel import LogMelSpectrogram
from engine_ref.sampling import GenerationParams
from engine_ref.finishing import cut_warning, join_segments, silent_warning

log = logging.getLogger("engine_ref.indextts.synthesizer")

AudioInput = Union[str, os.PathLike, bytes]
DEFAULT_MAX_REFERENCE_SECONDS = 50.0  # upstream infer_fast's cap; the conformer itself takes up to ~106 s


@dataclass(frozen=True)
class Speaker:
    """Everything derived from one reference recording; shared by every segment and request that uses it."""

    fingerprint: str
    conds: torch.Tensor  # [1, 32, model_dim] conditioning latents
    ref_mel: torch.Tensor  # [1, 100, frames] log-mel (BigVGAN's speaker encoder reads it too)
    speaker_embedding: torch.Tensor  # BigVGAN's ECAPA embedding of ref_mel
    seconds: float
    trimmed: bool


@dataclass
class Timings:
    text_s: float = 0.0
    speaker_s: float = 0.0
    generate_s: float = 0.0
    latent_s: float = 0.0
    vocoder_s: float = 0.0
    total_s: float = 0.0
    audio_s: float = 0.0
    tokens: int = 0
    speaker_cache_hit: bool = False

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of compute per second of audio (lower is faster)."""
        return self.total_s / self.audio_s if self.audio_s else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s if self.generate_s else 0.0


@dataclass
class SegmentAudio:
    index: int
    text: str
    codes: list[int]
    stopped: bool  # False: cut at max_mel_tokens (a warning was issued)
    pcm16: np.ndarray  # int16 samples at 24 kHz


@dataclass
class SynthesisResult:
    pcm16: np.ndarray
    sample_rate: int
    segments: list[SegmentAudio]
    timings: Timings
    seed: int
    warnings: list[str] = field(default_factory=list)

    @property
    def waveform(self) -> np.ndarray:
        """float32 in [-1, 1), upstream's returned scale (pcm / 32768)."""
        return self.pcm16.astype(np.float32) / 32768.0


class Synthesizer:
    def __init__(
        self,
        model: LoadedModel,
        *,
        speaker_cache_size: int = 16,
        max_reference_seconds: float = DEFAULT_MAX_REFERENCE_SECONDS,
    ):
        if speaker_cache_size < 0:
            raise ValueError("speaker_cache_size must be >= 0")
        self.model = model
        self.max_reference_seconds = max_reference_seconds
        self._speakers: BoundedLRU[str, Speaker] = BoundedLRU(speaker_cache_size)
        self._mel = LogMelSpectrogram()

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike, *, cache_dir: str | None = None, **kwargs) -> "Synthesizer":
        return cls(load_model(ref, cache_dir=cache_dir), **kwargs)

    @property
    def sample_rate(self) -> int:
        return self.model.config.sampling_rate

    # --- speaker conditioning -----------------------------------------------------------------------------------
    def speaker(self, reference: AudioInput | Speaker) -> tuple[Speaker, bool]:
        """Conditioning for a reference (bytes or path); returns (speaker, cache_hit)."""
        if isinstance(reference, Speaker):
            return reference, True
        data = _read_bytes(reference)
        key = f"{audio_fingerprint(data)}:{self.max_reference_seconds}"
        hit = self._speakers.get(key)
        if hit is not None:
            return hit, True
        clip = load_audio(data, target_sr=self.sample_rate, max_seconds=self.max_reference_seconds)
        with torch.inference_mode():
            mel = self._mel(clip.samples.unsqueeze(0))
            frames = torch.tensor([mel.shape[-1]])
            conds = self.model.gpt.conditioning(mel, frames)
            spk = self.model.bigvgan.speaker_embedding(mel.transpose(1, 2))
        speaker = Speaker(key, conds, mel, spk, clip.seconds, clip.trimmed)
        self._speakers.put(key, speaker)
        return speaker, False

    # --- synthesis ----------------------------------------------------------------------------------------------
    def stream(
        self,
        text: str,
        reference: AudioInput | Speaker,
        params: GenerationParams = GenerationParams(),
        *,
        max_text_tokens_per_segment: int = 120,
        bucket_max_size: int = 4,
        timings: Timings | None = None,
        warnings: list[str] | None = None,
    ) -> Iterator[SegmentAudio]:
        """Yield segments in text order as soon as each one and all before it are vocoded."""
        cfg = self.model.config.gpt
        params.validate(cfg)
        if bucket_max_size < 1:
            raise InputError(f"bucket_max_size={bucket_max_size} must be >= 1", "pass a bucket size of 1 or more")
        timings = timings if timings is not None else Timings()
        warnings = warnings if warnings is not None else []
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        t0 = time.perf_counter()
        segments = self.model.frontend.prepare(text, max_text_tokens_per_segment=max_text_tokens_per_segment)
        too_long = [s for s in segments if len(s.token_ids) + 2 > cfg.text_positions]
        if too_long:
            raise InputError(
                f"segment {too_long[0].index} has {len(too_long[0].token_ids)} text tokens; the model takes at most "
                f"{cfg.max_text_tokens}",
                f"lower max_text_tokens_per_segment (now {max_text_tokens_per_segment})",
            )
        buckets = self.model.frontend.bucket(segments, bucket_max_size)
        timings.text_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        speaker, hit = self.speaker(reference)
        timings.speaker_cache_hit = hit
        timings.speaker_s += time.perf_counter() - t0
        if speaker.trimmed:
            warnings.append(f"reference audio was trimmed to {self.max_reference_seconds:g} s")

        ready: dict[int, SegmentAudio] = {}
        next_index = 0
        for bucket in buckets:
            for seg in self._synthesize_bucket(bucket, speaker, params, seed, timings, warnings,
                                               max_text_tokens_per_segment):
                ready[seg.index] = seg
            while next_index in ready:
                yield ready.pop(next_index)
                next_index += 1
        while ready:  # only reached if the frontend skipped an index; never drop audio silently
            idx = min(ready)
            yield ready.pop(idx)

    def synthesize(
        self,
        text: str,
        reference: AudioInput | Speaker,
        params: GenerationParams = GenerationParams(),
        *,
        max_text_tokens_per_segment: int = 120,
        bucket_max_size: int = 4,
    ) -> SynthesisResult:
        start = time.perf_counter()
        timings = Timings()
        warnings: list[str] = []
        if params.seed is None:
            params = GenerationParams(**{**params.__dict__, "seed": secrets.randbits(62)})
        segments = list(
            self.stream(text, reference, params, max_text_tokens_per_segment=max_text_tokens_per_segment,
                        bucket_max_size=bucket_max_size, timings=timings, warnings=warnings)
        )
        pcm = join_segments([s.pcm16 for s in segments], 0)  # 1.x puts no silence between segments
        timings.total_s = time.perf_counter() - start
        timings.audio_s = pcm.shape[0] / self.sample_rate
        return SynthesisResult(pcm, self.sample_rate, segments, timings, int(params.seed), warnings)

    def _synthesize_bucket(self, bucket, speaker: Speaker, params: GenerationParams, seed: int, timings: Timings,
                           warnings: list[str], max_text_tokens_per_segment: int) -> list[SegmentAudio]:
        cfg = self.model.config.gpt
        gpt, vocoder = self.model.gpt, self.model.bigvgan
        ids = [generation_ids(s.token_ids, cfg.start_text_token, cfg.stop_text_token) for s in bucket]
        seeds = [segment_seed(seed, s.index) for s in bucket]
        t0 = time.perf_counter()
        decode = decode_sampling if params.num_beams == 1 else decode_beams
        outs = decode(gpt, speaker.conds, ids, [params] * len(bucket), seeds)
        timings.generate_s += time.perf_counter() - t0
        timings.tokens += sum(len(o.codes) + int(o.stopped) for o in outs)
        codes = []
        for seg, out in zip(bucket, outs):
            if not out.stopped:
                msg = cut_warning(seg.index, params.max_mel_tokens)
                log.warning(msg)
                warnings.append(msg)
            codes.append(remove_long_silence(out.codes))
        t0 = time.perf_counter()
        keep = [i for i, c in enumerate(codes) if c]
        lat = latent_pass(gpt, speaker.conds, [bucket[i].token_ids for i in keep], [codes[i] for i in keep]) if keep else []
        timings.latent_s += time.perf_counter() - t0
        results = []
        t0 = time.perf_counter()
        by_row = dict(zip(keep, lat))
        for i, seg in enumerate(bucket):
            if i in by_row:
                with torch.inference_mode():
                    wav = vocoder.decode(by_row[i].unsqueeze(0), speaker.speaker_embedding)
                pcm = to_pcm16(wav.reshape(-1))
            else:
                msg = silent_warning(seg.index)
                log.warning(msg)
                warnings.append(msg)
                pcm = np.zeros(0, np.int16)
            results.append(SegmentAudio(seg.index, seg.text, codes[i], outs[i].stopped, pcm))
        timings.vocoder_s += time.perf_counter() - t0
        return results


def _read_bytes(reference: AudioInput) -> bytes:
    if isinstance(reference, (bytes, bytearray, memoryview)):
        return bytes(reference)
    path = Path(reference)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"reference audio {path} does not exist", "pass the path of a wav/flac/mp3 file") from None
    except IsADirectoryError:
        raise InputError(f"reference audio {path} is a directory", "pass the path of a wav/flac/mp3 file") from None
    except OSError as exc:
        raise InputError(f"cannot read reference audio {path}: {exc.strerror}", "check the path and permissions") from None
