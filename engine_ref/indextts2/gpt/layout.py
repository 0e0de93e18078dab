"""Official key names and shapes of IndexTTS2's gpt.pth (UnifiedVoice v2), from the published layout.

Written from the checkpoint description (facts §4), independently of the nn.Modules, and built from the shared
tables: the decoder part is 1.x's (`engine_ref.layout.gpt.decoder_layout`, same names, shapes from the v2
config), the two Conformers and perceivers come from `engine_ref.layout.conditioning` with v2's widths, and the
new v2 entries are listed here: speed_emb, emo_layer, emovec_layer.

Random-preset init: GPT-2-style embeddings, fan-in scaled projections (the shared rules), so a random model keeps
unit-scale activations and stops after roughly `target_codes` codes (the shared stop ramp).
"""

from __future__ import annotations

from engine_ref.indextts2.gpt.config import SPEED_ROWS, GPTv2Config
from engine_ref.layout import Layout, TensorSpec
from engine_ref.layout.conditioning import BIAS_STD, conformer_entries, perceiver_entries
from engine_ref.layout.gpt import EMBED_STD, decoder_layout

EMO_LATENTS = 1  # the emotion perceiver has one latent (upstream constant)


def speaker_conditioner_layout(cfg: GPTv2Config) -> Layout:
    """`conditioning_encoder.*` (input: w2v-bert features) and `perceiver_encoder.*` (32 latents, model_dim)."""
    cm = cfg.condition_module
    return conformer_entries(cm, "conditioning_encoder.", cfg.feature_dim) | perceiver_entries(
        "perceiver_encoder.", cfg.model_dim, cm.output_size, cm.attention_heads, cm.perceiver_mult,
        cfg.condition_num_latent,
    )


def emotion_conditioner_layout(cfg: GPTv2Config) -> Layout:
    """`emo_conditioning_encoder.*` and `emo_perceiver_encoder.*` (one latent of emo_latent_dim)."""
    em = cfg.emo_condition_module
    return conformer_entries(em, "emo_conditioning_encoder.", cfg.feature_dim) | perceiver_entries(
        "emo_perceiver_encoder.", cfg.emo_latent_dim, em.output_size, em.attention_heads, em.perceiver_mult,
        EMO_LATENTS,
    )


def emotion_head_layout(cfg: GPTv2Config) -> Layout:
    """speed_emb [2, D], emovec_layer (emo latent -> D) and emo_layer (D -> D)."""
    d = cfg.model_dim
    return {
        "speed_emb.weight": TensorSpec((SPEED_ROWS, d), std=EMBED_STD),
        "emo_layer.weight": TensorSpec((d, d)),
        "emo_layer.bias": TensorSpec((d,), std=BIAS_STD),
        "emovec_layer.weight": TensorSpec((d, cfg.emo_latent_dim)),
        "emovec_layer.bias": TensorSpec((d,), std=BIAS_STD),
    }


def gpt_v2_layout(cfg: GPTv2Config, target_codes: int = 40, seed: int = 0) -> Layout:
    """Every gpt.pth entry: conditioners, emotion path, embeddings, GPT-2 body, norms and heads."""
    return (
        speaker_conditioner_layout(cfg)
        | emotion_conditioner_layout(cfg)
        | emotion_head_layout(cfg)
        | decoder_layout(cfg, target_codes, seed)  # type: ignore[arg-type]  # reads the same-named fields
    )


def gpt_v2_shapes(cfg: GPTv2Config) -> dict[str, tuple[int, ...]]:
    """Key -> shape, what the loader checks a checkpoint against."""
    return {k: spec.shape for k, spec in gpt_v2_layout(cfg).items()}
