"""IndexTTS-2.5's GPT: UnifiedVoice v2 built with ``spk_cond_mode="campplus"`` (model_v2.py at HEAD).

What differs from 2.0 (`engine_ref.indextts2.gpt`), everything else being 2.0's modules and weights:
- no speaker Conformer / perceiver and no speed_emb: the speaker is ONE row, ``spk_emb_proj(style)`` (Linear
  192 -> model_dim) of the CAMPPlus style (the same style s2mel uses);
- conds = (speaker row + emovec) ‖ two ZERO rows = 3 rows (2.0: 32 latents + 2 speed rows);
- ``lang_embedding`` [107, model_dim]: the segment's language row is added to every text row, start and stop
  included (text_embedding(id) + text_pos(k) + lang_embedding(lang));
- no teacher-forced latent pass (nothing downstream reads GPT latents in 2.5);
- loading is STRICT here (upstream loads 2.5's gpt.pth with strict=False): a missing or extra key is named, with
  a hint when the file is a 2.0 gpt.pth (it has the speaker conditioner and speed_emb instead).

Language in the decoder's interface: the shared decoding code (engine_ref.generate, beam_search) and the exported
prefill graph take text ids only, so the language travels IN the ids: a tagged id is ``id + lang * text_vocab``
(`tag_text_ids`), applied after ids 0/1 are dropped. `text_embeds` (and the prefill graph) read a row's language
as max(row) // text_vocab (start/stop/padding are untagged, every 2.5 segment holds its language-tag token, so
the maximum is a tagged id) and embed id % text_vocab. An untagged row is language 0 (en). See
`engine_ref.indextts2.v25.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from engine_ref.checkpoint import check_against_layout, gpt_state_dict, read_checkpoint, to_float32
from engine_ref.errors import CheckpointError, InputError
from engine_ref.indextts2.campplus import EMBEDDING_SIZE
from engine_ref.indextts2.gpt.config import GPTv2Config, _check
from engine_ref.indextts2.gpt.layout import EMO_LATENTS, emotion_conditioner_layout
from engine_ref.indextts2.gpt.model import UnifiedVoiceV2
from engine_ref.indextts2.v25.languages import LANGUAGE_ROWS
from engine_ref.layout import Layout, TensorSpec
from engine_ref.layout.conditioning import BIAS_STD
from engine_ref.layout.gpt import EMBED_STD, decoder_layout
from engine_ref.modules.conformer import ConformerEncoder
from engine_ref.modules.gpt2 import KV, GPT2Stack
from engine_ref.modules.perceiver import PerceiverResampler
from engine_ref.modules.unified_voice import LearnedPositions
from engine_ref.typed_config import build_dataclass

__all__ = ["GPTv25Config", "parse_gpt_v25", "INDEXTTS2_5_GPT", "gpt_v25_layout", "gpt_v25_shapes",
           "UnifiedVoiceV25", "build_gpt_v25", "load_gpt_v25", "tag_text_ids", "SPEAKER_ROWS", "ZERO_ROWS"]

SPEAKER_ROWS = 1  # spk_emb_proj(style): one row
ZERO_ROWS = 2  # where 2.0 has its two speed rows


@dataclass(frozen=True)
class GPTv25Config(GPTv2Config):
    """The 2.5 `gpt:` section: 2.0's keys (condition_module is still written, and unused), 3 conditioning rows."""

    @property
    def cond_rows(self) -> int:
        return SPEAKER_ROWS + ZERO_ROWS

    @property
    def language_rows(self) -> int:
        """Rows of lang_embedding (upstream: len(LANGUAGE_DICT) + 1 = 107)."""
        return LANGUAGE_ROWS

    @property
    def style_dim(self) -> int:
        return EMBEDDING_SIZE


def parse_gpt_v25(section: Mapping, prefix: str = "gpt.") -> GPTv25Config:
    """config.yaml's `gpt:` mapping (IndexTTS-2.5) -> GPTv25Config; ConfigError naming a missing/mistyped key."""
    from engine_ref.errors import ConfigError

    if not isinstance(section, Mapping):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, found {type(section).__name__}",
                          "use the config.yaml shipped with the IndexTTS-2.5 checkpoints")
    return _check(build_dataclass(GPTv25Config, dict(section), prefix))  # type: ignore[return-value]


def _official() -> GPTv25Config:
    import dataclasses

    from engine_ref.indextts2.gpt.config import INDEXTTS2_GPT

    fields = {f.name: getattr(INDEXTTS2_GPT, f.name) for f in dataclasses.fields(INDEXTTS2_GPT)}
    return GPTv25Config(**{**fields, "number_text_tokens": 60509})


#: The official values (configs/config_v2_5.yaml): 2.0's with number_text_tokens 60509.
INDEXTTS2_5_GPT = _official()


# --- published layout (key names and shapes; independent of the module below) ------------------------------------
def gpt_v25_layout(cfg: GPTv25Config, target_codes: int = 40, seed: int = 0) -> Layout:
    """Every gpt.pth entry of IndexTTS-2.5 (456 keys at the release's 24 layers: 307 + 149 emotion keys)."""
    d = cfg.model_dim
    heads = {
        "spk_emb_proj.weight": TensorSpec((d, cfg.style_dim)),
        "spk_emb_proj.bias": TensorSpec((d,), std=BIAS_STD),
        "lang_embedding.weight": TensorSpec((cfg.language_rows, d), std=EMBED_STD),
        "emo_layer.weight": TensorSpec((d, d)),
        "emo_layer.bias": TensorSpec((d,), std=BIAS_STD),
        "emovec_layer.weight": TensorSpec((d, cfg.emo_latent_dim)),
        "emovec_layer.bias": TensorSpec((d,), std=BIAS_STD),
    }
    return emotion_conditioner_layout(cfg) | heads | decoder_layout(cfg, target_codes, seed)  # type: ignore[arg-type]


def gpt_v25_shapes(cfg: GPTv25Config) -> dict[str, tuple[int, ...]]:
    return {k: spec.shape for k, spec in gpt_v25_layout(cfg).items()}


def tag_text_ids(ids: Sequence[int], lang_id: int, text_vocab: int) -> list[int]:
    """Cleaned text ids carrying their language: id + lang_id * text_vocab (module docstring)."""
    if not 0 <= lang_id < LANGUAGE_ROWS:
        raise InputError(f"language id {lang_id} is outside lang_embedding's {LANGUAGE_ROWS} rows",
                         "pass a language of engine_ref.indextts2.v25.languages")
    offset = lang_id * text_vocab
    return [int(i) + offset for i in ids]


class UnifiedVoiceV25(nn.Module):
    """Every 2.5 gpt.pth tensor under its official name; the interface the shared decoder code drives."""

    def __init__(self, cfg: GPTv25Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        em = cfg.emo_condition_module
        self.spk_emb_proj = nn.Linear(cfg.style_dim, d)
        self.emo_conditioning_encoder = ConformerEncoder(em, input_size=cfg.feature_dim, mask_after_glu=False)
        self.emo_perceiver_encoder = PerceiverResampler(
            cfg.emo_latent_dim, dim_context=em.output_size, ff_mult=em.perceiver_mult, heads=em.attention_heads,
            num_latents=EMO_LATENTS,
        )
        self.text_embedding = nn.Embedding(cfg.text_vocab, d)
        self.lang_embedding = nn.Embedding(cfg.language_rows, d)
        self.emo_layer = nn.Linear(d, d)
        self.emovec_layer = nn.Linear(cfg.emo_latent_dim, d)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, d)
        self.gpt = GPT2Stack(d, cfg.layers, cfg.heads)
        self.mel_pos_embedding = LearnedPositions(cfg.mel_positions, d)
        self.text_pos_embedding = LearnedPositions(cfg.text_positions, d)
        self.final_norm = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab)  # unused at inference, present in the checkpoint
        self.mel_head = nn.Linear(d, cfg.number_mel_codes)

    def forward(self, *args, **kwargs):
        raise TypeError("call UnifiedVoiceV25.speaker_rows / get_emovec / conditioning_rows / decode / ...")

    # --- the emotion path: 2.0's, unchanged (same modules, same names) ------------------------------------------
    _check_features = UnifiedVoiceV2._check_features
    _encode = UnifiedVoiceV2._encode
    emotion_latent = UnifiedVoiceV2.emotion_latent
    get_emovec = UnifiedVoiceV2.get_emovec
    merge_emovec = UnifiedVoiceV2.merge_emovec

    # --- conditioning -------------------------------------------------------------------------------------------
    def speaker_rows(self, style: torch.Tensor) -> torch.Tensor:
        """CAMPPlus style [B, 192] -> the speaker row [B, 1, D] = spk_emb_proj(style)."""
        if style.dim() != 2 or style.shape[1] != self.cfg.style_dim:
            raise InputError(f"the speaker style must be [batch, {self.cfg.style_dim}], got {list(style.shape)}",
                             "pass the CAMPPlus embedding of the speaker reference")
        return self.spk_emb_proj(style).unsqueeze(1)

    def conditioning_rows(self, speaker_rows: torch.Tensor, emovec: torch.Tensor) -> torch.Tensor:
        """[B, 1, D] speaker row + [B, D] emovec -> conds [B, 3, D] = (speaker + emovec) ‖ 0 ‖ 0."""
        b, _, d = speaker_rows.shape
        zeros = speaker_rows.new_zeros(b, ZERO_ROWS, d)
        return torch.cat([speaker_rows + emovec.unsqueeze(1), zeros], dim=1)

    # --- embeddings, transformer, heads (the interface of engine_ref.generate / beam_search) -------------------
    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] tagged text ids (wrapped in start/stop) -> text + position + language embeddings."""
        vocab = self.cfg.text_vocab
        lang = ids.max(dim=1).values // vocab
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            if int(lang.max()) >= self.cfg.language_rows or int(ids.min()) < 0:
                raise InputError("text ids carry a language outside lang_embedding", "tag ids with tag_text_ids")
        pos = torch.arange(ids.shape[1], device=ids.device)
        return (self.text_embedding(ids % vocab) + self.text_pos_embedding(pos).unsqueeze(0)
                + self.lang_embedding(lang).unsqueeze(1))

    def mel_embeds(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.mel_embedding(codes) + self.mel_pos_embedding(positions)

    def decode(self, embeds: torch.Tensor, key_valid: torch.Tensor,
               past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        return self.gpt(embeds, key_valid, past)

    def mel_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """final_norm then mel_head, after gpt.ln_f (two norms in series, as upstream)."""
        return self.mel_head(self.final_norm(hidden))

    def latents(self, hidden: torch.Tensor) -> torch.Tensor:
        """final_norm of the decoder output (2.5 does not use GPT latents; kept for the shared export checks)."""
        return self.final_norm(hidden)


# --- loading ------------------------------------------------------------------------------------------------------
_V2_MARKERS = ("speed_emb.weight", "conditioning_encoder.embed.conv.0.weight", "perceiver_encoder.latents")


def build_gpt_v25(cfg: GPTv25Config, state: Mapping[str, torch.Tensor], source: str = "gpt.pth") -> UnifiedVoiceV25:
    """A state dict (flat or under 'model') -> UnifiedVoiceV25 (eval, fp32); CheckpointError naming what differs."""
    flat = gpt_state_dict(dict(state))
    try:
        check_against_layout(flat, gpt_v25_shapes(cfg), source)
    except CheckpointError as exc:
        if any(k in flat for k in _V2_MARKERS) and "spk_emb_proj.weight" not in flat:
            raise CheckpointError(f"{exc.problem}; it holds the 2.0 speaker conditioner / speed_emb: this is an "
                                  "IndexTTS-2 (2.0) gpt.pth",
                                  "use the gpt.pth released with IndexTTS-2.5, or load this one as IndexTTS-2") from None
        raise
    with torch.inference_mode(False):
        model = UnifiedVoiceV25(cfg)
        model.load_state_dict(to_float32(flat), strict=True)
    return model.eval()


def load_gpt_v25(cfg: GPTv25Config, path: str | Path) -> UnifiedVoiceV25:
    """Read gpt.pth (weights_only, memory-mapped) and load it strictly."""
    path = Path(path)
    return build_gpt_v25(cfg, read_checkpoint(path), path.name)
