"""IndexTTS-2 request conditioning over the exported graphs: the speaker reference, the emotion reference and the
emotion mix, exactly as `export.indextts2.runtime.OrtIndexTTS2` (itself == engine_ref's Synthesizer2) computes
them, but with every graph reached through an async `GraphCall` and every blocking Python step through
`Blocking`, so the server's event loop never computes anything itself.

Speaker reference (cached per audio hash by the caller): 22.05 kHz librosa-style load and its sinc-Hann 16 kHz
resample -> SeamlessM4T features (Python) -> semantic_encoder -> semantic_codec (S_ref) -> s2mel_prompt; kaldi fbank
(Python) -> campplus (style); 22.05 kHz reference mel (Python); speaker_conditioner (32 latent rows) and
emotion_conditioner (the base emovec); the same file on the 16 kHz emotion path (the default emotion reference).
Independent graphs run concurrently. Emotion: upstream's precedence (`engine_ref.indextts2.emotion.plan_emotion`),
the bank rows picked once per request (cosine to the style, or a `random.Random(seed)`), then conds
[34, D] = (latents + emovec) ‖ speed rows (`export.indextts2.runtime.make_conds`).

IndexTTS-2.5 (`VoiceEncoderV25`, `mix_emotion_v25`; == `export.indextts2.v25.runtime.OrtIndexTTS25`): the same
audio and emotion paths, but the features are not quantised (s2mel_prompt regulates them directly), the speaker
row is speaker_projection(campplus style), there is no speaker conditioner, and conds [3, D] = (row + emovec) ‖ 0 ‖ 0.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from engine_ref.errors import InputError
from engine_ref.indextts2.emotion import EmotionBank, EmotionPlan, apply_emotion_vector, plan_emotion
from engine_ref.indextts2.synthesizer import Conditioning, EmotionOptions, EmotionReference, SpeakerV2
from export.indextts2.runtime import make_conds, upstream_lengths
from export.indextts2.v25.runtime import make_conds_v25
from model_repository.orchestrator import Speaker

__all__ = ["GraphCall", "Blocking", "VoiceV2", "VoiceV25", "ReferenceFrontEnd", "VoiceEncoderV2", "VoiceEncoderV25",
           "plan_request_emotion", "mixed_emovec", "mix_emotion", "mix_emotion_v25", "voice_for_request"]

#: graph name, feeds -> outputs by name (a Triton BLS call in the server)
GraphCall = Callable[[str, dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]
#: run a blocking function off the event loop: await blocking(fn, *args)
Blocking = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, eq=False)
class VoiceV2(Speaker):
    """One request's voice as the orchestrator and the IndexTTS-2 stages take it: the orchestrator's Speaker (conds
    = the request's 34 rows with its emotion mixed in, speaker_embedding = the CAMPPlus style) plus s2mel's prompt."""

    prompt_condition: np.ndarray | None = None  # [T_ref, content]
    ref_mel: np.ndarray | None = None  # [mels, T_ref]


@dataclass(frozen=True, eq=False)
class VoiceV25(VoiceV2):
    """IndexTTS-2.5's per-request voice: VoiceV2 (conds = the request's 3 rows) plus the request's duration factor."""

    duration_factor: float = 1.0


class ReferenceFrontEnd:
    """What the export leaves in Python for references: audio loading/resampling, the SeamlessM4T extractor, the
    kaldi fbank and the 22.05 kHz mel. Its methods block (call them through `Blocking`)."""

    def __init__(self, export_dir: Path, manifest, config, cut_seconds: float | None):
        from transformers import SeamlessM4TFeatureExtractor

        from engine_ref.indextts2.fbank import KaldiFbank
        from engine_ref.indextts2.mel22k import ReferenceMel22k, upstream_fmax

        assets = manifest.assets
        self.extractor = SeamlessM4TFeatureExtractor.from_pretrained(
            str((export_dir / assets["feature_extractor"]).parent), local_files_only=True)
        self.fbank = KaldiFbank(sample_rate=16000.0, num_mel_bins=80)
        spect = config.s2mel.preprocess_params.spect_params
        self.ref_mel = ReferenceMel22k(sample_rate=config.sample_rate, n_fft=spect.n_fft, hop_length=spect.hop_length,
                                       win_length=spect.win_length, n_mels=spect.n_mels, f_min=float(spect.fmin),
                                       f_max=upstream_fmax({"fmax": spect.fmax})).eval()
        self.cut_seconds = cut_seconds

    def inputs(self, samples_16k: torch.Tensor):
        from engine_ref.indextts2.features import extract_input_features

        return extract_input_features(self.extractor, [samples_16k])

    @torch.inference_mode()
    def speaker_audio(self, data: bytes):
        """(SpeakerAudio, extractor inputs of audio_16k, ref mel [1, mels, T_ref], CAMPPlus fbank [1, T, 80])."""
        from engine_ref.indextts2.reference import load_speaker_audio

        audio = load_speaker_audio(data, cut_seconds=self.cut_seconds)
        a16, a22 = audio.audio_16k.samples, audio.audio_22k.samples
        return audio, self.inputs(a16), self.ref_mel(a22.unsqueeze(0)), self.fbank(a16.unsqueeze(0)).numpy()

    def emotion_audio(self, data: bytes):
        """(the clip on the 16 kHz emotion path, its extractor inputs)."""
        from engine_ref.indextts2.reference import load_emotion_audio

        clip = load_emotion_audio(data, cut_seconds=self.cut_seconds)
        return clip, self.inputs(clip.samples)


class VoiceEncoderV2:
    """Speaker and emotion references -> engine_ref's SpeakerV2 / EmotionReference, every network a graph call."""

    def __init__(self, front: ReferenceFrontEnd, graphs: GraphCall, blocking: Blocking, feature_dim: int):
        self.front, self.graphs, self.blocking, self.feature_dim = front, graphs, blocking, feature_dim

    async def features(self, inputs) -> np.ndarray:
        """Normalised w2v-BERT layer-17 features [1, T, D] of one clip's extractor inputs."""
        out = await self.graphs("semantic_encoder", {
            "input_features": inputs.input_features.numpy(),
            "attention_mask": inputs.attention_mask.numpy().astype(np.int64)})
        return out["features"][:, : int(inputs.frame_counts[0])]

    async def conditioner(self, name: str, feats: np.ndarray) -> np.ndarray:
        lengths = np.array([upstream_lengths(feats.shape[1], self.feature_dim)], np.int64)
        out = await self.graphs(name, {"features": feats, "feature_lengths": lengths})
        return next(iter(out.values()))

    async def emotion(self, data: bytes, key: str) -> EmotionReference:
        clip, inputs = await self.blocking(self.front.emotion_audio, data)
        feats = await self.features(inputs)
        emovec = await self.conditioner("emotion_conditioner", feats)
        return EmotionReference(key, torch.from_numpy(feats), torch.from_numpy(emovec), clip.seconds, clip.trimmed)

    async def speaker(self, data: bytes, key: str) -> SpeakerV2:
        own = asyncio.ensure_future(self.emotion(data, "self:" + key))  # the 16 kHz emotion path, in parallel
        try:
            audio, inputs, ref_mel, fbank = await self.blocking(self.front.speaker_audio, data)
            feats = await self.features(inputs)
            frames = np.array([feats.shape[1]], np.int64)

            async def prompt():
                s_ref = (await self.graphs("semantic_codec", {"features": feats, "lengths": frames}))["embedding"]
                out = await self.graphs("s2mel_prompt", {"semantic": s_ref, "semantic_lengths": frames,
                                                         "mel_frames": np.array([ref_mel.shape[-1]], np.int64)})
                return s_ref, out["prompt_condition"]

            (s_ref, prompt_condition), style, latents, base = await asyncio.gather(
                prompt(), self.graphs("campplus", {"fbank": fbank}),
                self.conditioner("speaker_conditioner", feats), self.conditioner("emotion_conditioner", feats))
            self_emotion = await own
        except BaseException:
            own.cancel()
            raise
        t = torch.from_numpy
        return SpeakerV2(key, t(feats), t(s_ref), t(style["style"]), ref_mel, t(prompt_condition), t(latents), t(base),
                         self_emotion, audio.audio_22k.seconds, audio.audio_22k.trimmed)


class VoiceEncoderV25(VoiceEncoderV2):
    """IndexTTS-2.5's speaker reference -> engine_ref's SpeakerV25 (emotion references as 2.0's)."""

    async def speaker(self, data: bytes, key: str):  # type: ignore[override]
        from engine_ref.indextts2.v25.synthesizer import SpeakerV25

        own = asyncio.ensure_future(self.emotion(data, "self:" + key))  # the 16 kHz emotion path, in parallel
        try:
            audio, inputs, ref_mel, fbank = await self.blocking(self.front.speaker_audio, data)
            feats = await self.features(inputs)

            async def prompt():
                out = await self.graphs("s2mel_prompt", {
                    "semantic": feats, "semantic_lengths": np.array([feats.shape[1]], np.int64),
                    "mel_frames": np.array([ref_mel.shape[-1]], np.int64)})
                return out["prompt_condition"]

            async def speaker_row():
                style = (await self.graphs("campplus", {"fbank": fbank}))["style"]
                return style, (await self.graphs("speaker_projection", {"style": style}))["speaker_row"]

            prompt_condition, (style, row), base = await asyncio.gather(
                prompt(), speaker_row(), self.conditioner("emotion_conditioner", feats))
            self_emotion = await own
        except BaseException:
            own.cancel()
            raise
        t = torch.from_numpy
        return SpeakerV25(key, t(feats), t(style), ref_mel, t(prompt_condition), t(row), t(base), self_emotion,
                          audio.audio_22k.seconds, audio.audio_22k.trimmed)


def plan_request_emotion(emotion: EmotionOptions, vector: tuple[float, ...] | None,
                         warnings: list[str]) -> EmotionPlan:
    """Upstream's precedence for one request (`vector`: the request's or the text-emotion model's), with
    Synthesizer2's warnings for settings that have no effect."""
    if vector is not None and emotion.reference is not None:
        warnings.append("an emotion vector/text overrides the emotion reference audio (as upstream); it is unused")
    plan = plan_emotion(vector, emotion.alpha, emotion.reference is not None, emotion.alpha_mode,
                        from_text=emotion.from_text)
    alpha_unused = plan.merge_alpha == 1.0 and (plan.weights is None or emotion.alpha_mode == "rel")
    if emotion.alpha != 1.0 and alpha_unused:
        warnings.append(f"emo_alpha={emotion.alpha:g} has no effect without emotion reference audio "
                        f"(alpha mode {emotion.alpha_mode}); upstream ignores it too")
    return plan


@torch.inference_mode()
def mixed_emovec(speaker, plan: EmotionPlan, emo: EmotionReference, use_random: bool, bank: EmotionBank,
                 seed: int) -> tuple[torch.Tensor, tuple | None]:
    """One request's emovec and the bank rows it used: Synthesizer2.conditioning's arithmetic (OrtIndexTTS2's order
    of ops), the same for IndexTTS-2 and 2.5."""
    base = speaker.base_emovec
    emovec = base + plan.merge_alpha * (emo.emovec - base)
    rows = None
    if plan.weights is not None:
        rng = random.Random(seed) if use_random else None
        rows = tuple(bank.select(speaker.style, use_random, rng))
        emovec = apply_emotion_vector(emovec, bank.mix(rows, plan.weights).to(emovec), plan.weights)
    return emovec, rows


def mix_emotion(speaker: SpeakerV2, plan: EmotionPlan, emo: EmotionReference, use_random: bool, bank: EmotionBank,
                speed_emb: np.ndarray, seed: int) -> Conditioning:
    """conds [1, 34, D] of one IndexTTS-2 request."""
    emovec, rows = mixed_emovec(speaker, plan, emo, use_random, bank, seed)
    conds = make_conds(speaker.latents.numpy(), emovec.numpy(), speed_emb)
    return Conditioning(torch.from_numpy(conds), emovec, plan, plan.weights, rows)


def mix_emotion_v25(speaker, plan: EmotionPlan, emo: EmotionReference, use_random: bool, bank: EmotionBank,
                    seed: int) -> Conditioning:
    """conds [1, 3, D] of one IndexTTS-2.5 request: (speaker row + emovec) ‖ 0 ‖ 0."""
    emovec, rows = mixed_emovec(speaker, plan, emo, use_random, bank, seed)
    conds = make_conds_v25(speaker.latents.numpy(), emovec.numpy())
    return Conditioning(torch.from_numpy(conds), emovec, plan, plan.weights, rows)


def voice_for_request(speaker: SpeakerV2, cond: Conditioning, cls: type[VoiceV2] = VoiceV2, **extra) -> VoiceV2:
    """The orchestrator's view of one request's voice (`cls` / `extra`: a family's per-request fields)."""
    if speaker.prompt_condition.shape[0] != 1:
        raise InputError("a speaker reference must be one clip", "send one reference recording")
    return cls(
        key=speaker.fingerprint, conds=np.ascontiguousarray(cond.conds[0].numpy(), np.float32),
        speaker_embedding=np.ascontiguousarray(speaker.style[0].numpy(), np.float32), seconds=speaker.seconds,
        trimmed=speaker.trimmed, prompt_condition=np.ascontiguousarray(speaker.prompt_condition[0].numpy(), np.float32),
        ref_mel=np.ascontiguousarray(speaker.ref_mel[0].numpy(), np.float32), **extra)
