"""IndexTTS2 assembled from the exported graphs (ONNX Runtime) plus the pieces the export leaves in Python.

`OrtIndexTTS2` runs a request the way `engine_ref.indextts2.synthesizer.Synthesizer2` does, stage for stage, but
every network is an exported graph: semantic_encoder, semantic_codec, campplus, speaker/emotion_conditioner,
gpt_prefill/gpt_decode (through export.runtime.OrtDecoder: generation and the teacher-forced latent pass),
s2mel_prompt, s2mel_cond, cfm_estimator (driven by engine_ref's own `euler_step`) and the vocoder. In Python, as
in engine_ref: audio loading and resampling, the SeamlessM4T extractor, the kaldi fbank, the 22.05 kHz reference
mel, the emotion plan and vector mix, the CFM noise (the same per-segment seeded generator), the Euler update and
CFG combination, PCM16 and the interval silence. Same seed, same request -> the same audio as Synthesizer2 (tests:
within 2 LSB for greedy requests).

It is the reference for serving (what the Triton models must compute) and the export's end-to-end check, not a
server: one request at a time; `num_beams > 1` belongs to the decoder model's scheduler (an InputError here).
`mel_frames` runs a padded batch of segments through one estimator call per step, like Synthesizer2's batch mode.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from engine_ref.audio import audio_fingerprint, to_pcm16
from engine_ref.cache import BoundedLRU
from engine_ref.errors import InputError, ModelFilesError
from engine_ref.families import FAMILY_NAMES, INDEXTTS2
from engine_ref.generate import generation_ids
from engine_ref.indextts2.emotion import apply_emotion_vector, load_emotion_bank, plan_emotion
from engine_ref.indextts2.gpt import V2_GENERATION_DEFAULTS
from engine_ref.indextts2.gpt.generate import check_text_lengths
from engine_ref.indextts2.s2mel import euler_schedule, euler_step, prompt_inputs, target_mel_frames
from engine_ref.indextts2.s2mel.cfm import DEFAULT_CFG_RATE, DEFAULT_STEPS
from engine_ref.indextts2.synthesizer import (
    _NOISE_SALT, INTERVAL_SILENCE_MS, Conditioning, EmotionOptions, EmotionReference, NoiseFn, SpeakerV2, TimingsV2,
    lookup_reference,
)
from engine_ref.params import segment_seed
from engine_ref.sampling import GenerationParams
from engine_ref.indextts.synthesizer import SegmentAudio, SynthesisResult
from engine_ref.finishing import cut_warning, interval_samples, join_segments, silent_warning
from export.common import session
from export.manifest import Manifest, read_manifest
from export.runtime import OrtDecoder

log = logging.getLogger("export.indextts2.runtime")

__all__ = ["OrtIndexTTS2", "OrtEstimator", "make_conds", "upstream_lengths"]


def make_conds(latents: np.ndarray, emovec: np.ndarray, speed_emb: np.ndarray) -> np.ndarray:
    """Speaker latents [B, 32, D] + emovec [B, D] + speed_emb [2, D] -> conds [B, 34, D] (float32, as engine_ref):
    (latents + emovec) ‖ speed_emb[1] ‖ speed_emb[0]."""
    latents = np.asarray(latents, np.float32)
    emovec = np.asarray(emovec, np.float32).reshape(latents.shape[0], 1, -1)
    speed = np.asarray(speed_emb, np.float32)
    rows = np.broadcast_to(speed[[1, 0]][None], (latents.shape[0], 2, speed.shape[1]))
    return np.concatenate([latents + emovec, rows], axis=1)


def upstream_lengths(frames: int, feature_dim: int) -> int:
    """The frame count upstream hands the Conformers for a lone reference: min(frames, feature width)."""
    return min(int(frames), int(feature_dim))


class OrtEstimator:
    """An ORT session of cfm_estimator as the callable engine_ref's `euler_step` expects (torch in, torch out)."""

    def __init__(self, sess):
        self.sess = sess
        self.calls = 0

    def __call__(self, x, prompt_x, x_lens, t, style, cond) -> torch.Tensor:
        self.calls += 1
        feeds = {"x": x, "prompt_x": prompt_x, "x_lens": x_lens, "t": t, "style": style, "cond": cond}
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        feeds["x_lens"] = feeds["x_lens"].astype(np.int64)
        feeds["t"] = feeds["t"].astype(np.float32)
        return torch.from_numpy(self.sess.run(["velocity"], feeds)[0])


class OrtIndexTTS2:
    """Synthesizer2's request path on the exported graphs (see the module docstring).

    precision: a gpt_decode variant (int8/int4/fp16) to decode with; the other graphs are fp32.
    """

    FAMILY = INDEXTTS2
    GRAPHS = ("semantic_encoder", "semantic_codec", "campplus", "speaker_conditioner", "emotion_conditioner",
              "s2mel_prompt", "s2mel_cond", "cfm_estimator", "vocoder")

    def __init__(self, export_dir: str | Path, *, threads: int | None = None, precision: str | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), max_reference_seconds: float | None = None,
                 diffusion_steps: int = DEFAULT_STEPS, cfg_rate: float = DEFAULT_CFG_RATE,
                 interval_silence_ms: int = INTERVAL_SILENCE_MS, cache_size: int = 8,
                 manifest: Manifest | None = None):
        from transformers import SeamlessM4TFeatureExtractor

        from engine_ref.indextts2.fbank import KaldiFbank
        from engine_ref.indextts2.mel22k import ReferenceMel22k, upstream_fmax

        self.export_dir = Path(export_dir)
        self.manifest = manifest or read_manifest(self.export_dir)
        if self.manifest.model.get("family") != self.FAMILY:
            name = FAMILY_NAMES[self.FAMILY]
            raise ModelFilesError(f"{self.export_dir} holds a {self.manifest.model.get('family')!r} export, not "
                                  f"{name}", f"export an {name} directory with `triton-tts export`")
        assets = self.manifest.assets
        self.sessions = {name: session(self.export_dir / self.manifest.component(name).file, threads, providers)
                         for name in self.GRAPHS}
        self.decoder = OrtDecoder.from_manifest(self.export_dir, self.manifest, precision=precision, threads=threads,
                                                providers=providers)
        self.estimator = OrtEstimator(self.sessions["cfm_estimator"])
        self.config = cfg = self._load_config()
        self.frontend = self._text_frontend()
        self.extractor = SeamlessM4TFeatureExtractor.from_pretrained(
            str((self.export_dir / assets["feature_extractor"]).parent), local_files_only=True)
        self.fbank = KaldiFbank(sample_rate=16000.0, num_mel_bins=80)
        spect = cfg.s2mel.preprocess_params.spect_params
        self.ref_mel = ReferenceMel22k(sample_rate=cfg.sample_rate, n_fft=spect.n_fft, hop_length=spect.hop_length,
                                       win_length=spect.win_length, n_mels=spect.n_mels, f_min=float(spect.fmin),
                                       f_max=upstream_fmax({"fmax": spect.fmax})).eval()
        self.bank = load_emotion_bank(self.export_dir / assets["spk_matrix"], self.export_dir / assets["emo_matrix"],
                                      cfg.emo_num)
        self.speed_emb = np.load(self.export_dir / assets["speed_emb"]) if "speed_emb" in assets else None
        self.feature_dim = int(cfg.semantic_dim)
        self.sample_rate = int(cfg.sample_rate)
        self.max_reference_seconds = max_reference_seconds
        self.diffusion_steps, self.cfg_rate = diffusion_steps, cfg_rate
        self.interval_samples = interval_samples(self.sample_rate, interval_silence_ms)
        self._speakers: BoundedLRU[str, SpeakerV2] = BoundedLRU(cache_size)
        self._emotions: BoundedLRU[str, EmotionReference] = BoundedLRU(cache_size)
        self._qwen = None

    # --- family hooks (IndexTTS-2.5's runner overrides them: export/indextts2/v25/runtime.py) ---------------
    def _load_config(self):
        from engine_ref.indextts2.config import load_v2_config

        return load_v2_config(self.export_dir / self.manifest.assets["config"])

    def _text_frontend(self):
        from engine_ref.text import TextFrontend

        gpt = self.config.gpt
        return TextFrontend(self.export_dir / self.manifest.assets["bpe"], start_text_token=gpt.start_text_token,
                            stop_text_token=gpt.stop_text_token, number_text_tokens=gpt.number_text_tokens)

    def _conds(self, speaker, emovec: torch.Tensor) -> np.ndarray:
        """conds [1, 34, D] = (latents + emovec) ‖ speed rows."""
        return make_conds(speaker.latents.numpy(), emovec.numpy(), self.speed_emb)

    # --- graphs ---------------------------------------------------------------------------------------------
    def run(self, name: str, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)

    def features(self, samples_16k: torch.Tensor) -> np.ndarray:
        """16 kHz clip -> normalised w2v-BERT layer-17 features [1, T, D] (extractor in Python, encoder graph)."""
        from engine_ref.indextts2.features import extract_input_features

        inputs = extract_input_features(self.extractor, [samples_16k])
        (feats,) = self.run("semantic_encoder", input_features=inputs.input_features.numpy(),
                            attention_mask=inputs.attention_mask.numpy().astype(np.int64))
        return feats[:, : int(inputs.frame_counts[0])]

    def _conditioner(self, name: str, feats: np.ndarray) -> np.ndarray:
        lengths = np.array([upstream_lengths(feats.shape[1], self.feature_dim)], np.int64)
        return self.run(name, features=feats, feature_lengths=lengths)[0]

    # --- references -----------------------------------------------------------------------------------------
    def _key(self, data: bytes) -> str:
        return f"{audio_fingerprint(data)}:{self.max_reference_seconds}"

    def _emotion_from_bytes(self, data: bytes, key: str) -> EmotionReference:
        from engine_ref.indextts2.reference import load_emotion_audio

        clip = load_emotion_audio(data, cut_seconds=self.max_reference_seconds)
        feats = self.features(clip.samples)
        emovec = self._conditioner("emotion_conditioner", feats)
        return EmotionReference(key, torch.from_numpy(feats), torch.from_numpy(emovec), clip.seconds, clip.trimmed)

    @torch.inference_mode()
    def speaker(self, reference) -> SpeakerV2:
        """A speaker reference (bytes or path) -> engine_ref's SpeakerV2, every network an exported graph."""
        from engine_ref.indextts2.reference import load_speaker_audio

        hit, data, key = lookup_reference(reference, SpeakerV2, self._speakers, "speaker reference audio", self._key)
        if hit is not None:
            return hit
        audio = load_speaker_audio(data, cut_seconds=self.max_reference_seconds)
        a16, a22 = audio.audio_16k.samples, audio.audio_22k.samples
        feats = self.features(a16)
        frames = np.array([feats.shape[1]], np.int64)
        _, s_ref = self.run("semantic_codec", features=feats, lengths=frames)
        ref_mel = self.ref_mel(a22.unsqueeze(0))
        (style,) = self.run("campplus", fbank=self.fbank(a16.unsqueeze(0)).numpy())
        (prompt,) = self.run("s2mel_prompt", semantic=s_ref, semantic_lengths=frames,
                             mel_frames=np.array([ref_mel.shape[-1]], np.int64))
        latents = self._conditioner("speaker_conditioner", feats)
        base = self._conditioner("emotion_conditioner", feats)
        own = self._emotion_from_bytes(data, "self:" + key)
        t = torch.from_numpy
        speaker = SpeakerV2(key, t(feats), t(s_ref), t(style), ref_mel, t(prompt), t(latents), t(base), own,
                            audio.audio_22k.seconds, audio.audio_22k.trimmed)
        self._speakers.put(key, speaker)
        return speaker

    def emotion_reference(self, reference) -> EmotionReference:
        hit, data, key = lookup_reference(reference, EmotionReference, self._emotions, "emotion reference audio",
                                          self._key)
        if hit is None:
            hit = self._emotion_from_bytes(data, key)
            self._emotions.put(key, hit)
        return hit

    # --- conditioning ---------------------------------------------------------------------------------------
    def _qwen_vector(self, text: str, seed: int) -> tuple[float, ...]:
        if self._qwen is None:
            from engine_ref.indextts2.qwen_emotion import QwenEmotion

            self._qwen = QwenEmotion(Path(self.manifest.model["qwen_emotion_dir"]))
        return self._qwen.vector(text, seed)

    @torch.inference_mode()
    def conditioning(self, speaker: SpeakerV2, emotion: EmotionOptions = EmotionOptions(), *, text: str = "",
                     seed: int = 0, warnings: list[str] | None = None) -> Conditioning:
        """conds [1, 34, D]: Synthesizer2.conditioning's emotion precedence and arithmetic, conds via make_conds."""
        emotion.validate()
        vector = emotion.vector
        if emotion.from_text:
            vector = self._qwen_vector(emotion.text if emotion.text is not None else text, seed)
        if vector is not None and emotion.reference is not None and warnings is not None:
            warnings.append("an emotion vector/text overrides the emotion reference audio (as upstream); it is unused")
        plan = plan_emotion(vector, emotion.alpha, emotion.reference is not None, emotion.alpha_mode,
                            from_text=emotion.from_text)
        emo = speaker.self_emotion if plan.emotion_audio_is_speaker else self.emotion_reference(emotion.reference)
        base = speaker.base_emovec
        emovec = base + plan.merge_alpha * (emo.emovec - base)
        rows = None
        if plan.weights is not None:
            rng = random.Random(seed) if emotion.random else None
            rows = tuple(self.bank.select(speaker.style, emotion.random, rng))
            emovec = apply_emotion_vector(emovec, self.bank.mix(rows, plan.weights).to(emovec), plan.weights)
        return Conditioning(torch.from_numpy(self._conds(speaker, emovec)), emovec, plan, plan.weights, rows)

    # --- s2mel ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def mel_frames(self, speaker: SpeakerV2, codes: Sequence[Sequence[int]], latents: Sequence[np.ndarray],
                   indices: Sequence[int], seed: int, noise_fn: NoiseFn | None = None) -> list[torch.Tensor]:
        """Generated mels [1, mels, floor(1.72 N_i)] of a padded batch of segments (Synthesizer2.mel_frames)."""
        b = len(codes)
        lens = np.array([len(c) for c in codes], np.int64)
        width = int(lens.max())
        code_batch = np.zeros((b, width), np.int64)
        latent_batch = np.zeros((b, width, latents[0].shape[-1]), np.float32)
        for i, (c, lat) in enumerate(zip(codes, latents)):
            code_batch[i, : len(c)] = c
            latent_batch[i, : len(c)] = lat
        cond, _ = self.run("s2mel_cond", codes=code_batch, latents=latent_batch, code_lengths=lens)
        return self.sample_mels(speaker, torch.from_numpy(cond), target_mel_frames(torch.from_numpy(lens)), indices,
                                seed, noise_fn)

    @torch.inference_mode()
    def sample_mels(self, speaker, cond: torch.Tensor, targets: torch.Tensor, indices: Sequence[int], seed: int,
                    noise_fn: NoiseFn | None = None) -> list[torch.Tensor]:
        """The CFM on cfm_estimator for a padded batch (Synthesizer2.sample_mels): cond [B, max T, C], zeros past
        each row's `targets` -> one generated mel [1, mels, targets_i] per row."""
        b = cond.shape[0]
        t_ref = speaker.ref_mel.shape[-1]
        mu = torch.cat([speaker.prompt_condition.expand(b, -1, -1), cond], dim=1)
        totals = t_ref + targets
        n_mels = speaker.ref_mel.shape[1]
        z = mu.new_zeros(b, n_mels, mu.shape[1])
        for i, (index, total) in enumerate(zip(indices, totals.tolist())):
            shape = (1, n_mels, total)
            if noise_fn is not None:
                noise = noise_fn(index, shape)
                if tuple(noise.shape) != shape:
                    raise InputError(f"noise_fn gave {list(noise.shape)} for segment {index}, expected {list(shape)}",
                                     "return noise of the requested shape")
            else:
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(segment_seed(seed ^ _NOISE_SALT,
                                                                                                  index)))
            z[i, :, :total] = noise[0].to(z)
        prompt_lens = torch.full((b,), t_ref, dtype=torch.long)
        x, prompt_x = prompt_inputs(z, speaker.ref_mel.expand(b, -1, -1), prompt_lens)
        style = speaker.style.expand(b, -1)
        ts, dts = euler_schedule(self.diffusion_steps)
        for k in range(self.diffusion_steps):
            x = euler_step(self.estimator, x, prompt_x, totals, prompt_lens, ts[k], dts[k], style, mu, self.cfg_rate)
        return [x[i : i + 1, :, t_ref:total] for i, total in enumerate(totals.tolist())]

    def vocode(self, mel: torch.Tensor) -> np.ndarray:
        (wav,) = self.run("vocoder", mel=np.ascontiguousarray(mel.numpy(), np.float32))
        return to_pcm16(torch.from_numpy(wav).reshape(-1))

    # --- requests -------------------------------------------------------------------------------------------
    def stream(self, text: str, reference, params: GenerationParams = V2_GENERATION_DEFAULTS, *,
               emotion: EmotionOptions = EmotionOptions(), max_text_tokens_per_segment: int = 120,
               noise_fn: NoiseFn | None = None, timings: TimingsV2 | None = None,
               warnings: list[str] | None = None) -> Iterator[SegmentAudio]:
        """Segments in text order (no gaps), each as Synthesizer2 makes it for the same seed."""
        return self._stream(text, reference, params, None, emotion=emotion,
                            max_text_tokens_per_segment=max_text_tokens_per_segment, noise_fn=noise_fn,
                            timings=timings, warnings=warnings)

    def synthesize(self, text: str, reference, params: GenerationParams = V2_GENERATION_DEFAULTS, *,
                   emotion: EmotionOptions = EmotionOptions(), max_text_tokens_per_segment: int = 120,
                   noise_fn: NoiseFn | None = None) -> SynthesisResult:
        """The whole utterance, segments joined with interval_samples zeros (Synthesizer2.synthesize)."""
        return self._synthesize(text, reference, params, None, emotion=emotion,
                                max_text_tokens_per_segment=max_text_tokens_per_segment, noise_fn=noise_fn)

    def _segments(self, text: str, max_text_tokens_per_segment: int, request) -> list[tuple[object, list[int]]]:
        """(segment, the ids generation decodes) per segment; `request` is a subclass's per-request options."""
        cfg = self.config.gpt
        segments = self.frontend.prepare(text, max_text_tokens_per_segment=max_text_tokens_per_segment)
        check_text_lengths(cfg, [s.token_ids for s in segments])
        return [(s, generation_ids(list(s.token_ids), cfg.start_text_token, cfg.stop_text_token)) for s in segments]

    def _segment_mel(self, speaker, conds: np.ndarray, seg, codes: list[int], seed: int, noise_fn: NoiseFn | None,
                     timings: TimingsV2, request) -> torch.Tensor:
        """One segment's generated mel from its codes: the latent pass, then s2mel."""
        with _clock(timings, "latent"):
            (latent,) = self.decoder.latents(conds, [list(seg.token_ids)], [codes])
        with _clock(timings, "s2mel"):
            (mel,) = self.mel_frames(speaker, [codes], [latent], [seg.index], seed, noise_fn)
        return mel

    def _stream(self, text: str, reference, params: GenerationParams, request, *, emotion: EmotionOptions,
                max_text_tokens_per_segment: int, noise_fn: NoiseFn | None, timings: TimingsV2 | None,
                warnings: list[str] | None) -> Iterator[SegmentAudio]:
        cfg = self.config.gpt
        params.validate(cfg)  # type: ignore[arg-type]
        if params.num_beams != 1:
            raise InputError(f"num_beams={params.num_beams}: this ONNX reference runner decodes one beam",
                             "use num_beams=1 here (beam search runs in the served decoder model)")
        timings = timings if timings is not None else TimingsV2()
        warnings = warnings if warnings is not None else []
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        with _clock(timings, "text"):
            segments = self._segments(text, max_text_tokens_per_segment, request)
        with _clock(timings, "features"):
            speaker = self.speaker(reference)
        if speaker.trimmed:
            warnings.append(f"reference audio was cut to its first {self.max_reference_seconds:g} s")
        with _clock(timings, "conditioning"):
            cond = self.conditioning(speaker, emotion, text=text, seed=seed, warnings=warnings)
        conds = cond.conds.numpy()
        for seg, ids in segments:
            with _clock(timings, "generate"):
                out = self.decoder.greedy(conds, ids, params, segment_seed(seed, seg.index))
            timings.tokens += len(out.codes) + int(out.stopped)
            if not out.stopped:
                warnings.append(cut_warning(seg.index, params.max_mel_tokens))
            if not out.codes:
                warnings.append(silent_warning(seg.index))
                yield SegmentAudio(seg.index, seg.text, out.codes, out.stopped, np.zeros(0, np.int16))
                continue
            mel = self._segment_mel(speaker, conds, seg, out.codes, seed, noise_fn, timings, request)
            with _clock(timings, "vocoder"):
                pcm = self.vocode(mel)
            yield SegmentAudio(seg.index, seg.text, out.codes, out.stopped, pcm)

    def _synthesize(self, text: str, reference, params: GenerationParams, request, *, emotion: EmotionOptions,
                    max_text_tokens_per_segment: int, noise_fn: NoiseFn | None) -> SynthesisResult:
        start = time.perf_counter()
        timings, warnings = TimingsV2(), []
        if params.seed is None:
            params = replace(params, seed=secrets.randbits(62))
        segments = list(self._stream(text, reference, params, request, emotion=emotion,
                                     max_text_tokens_per_segment=max_text_tokens_per_segment, noise_fn=noise_fn,
                                     timings=timings, warnings=warnings))
        pcm = join_segments([seg.pcm16 for seg in segments], self.interval_samples)
        timings.total_s = time.perf_counter() - start
        timings.audio_s = pcm.shape[0] / self.sample_rate
        return SynthesisResult(pcm, self.sample_rate, segments, timings, int(params.seed), warnings)  # type: ignore


@contextmanager
def _clock(timings: TimingsV2, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        setattr(timings, f"{name}_s", getattr(timings, f"{name}_s") + time.perf_counter() - t0)
