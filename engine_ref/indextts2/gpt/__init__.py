"""IndexTTS2's GPT (UnifiedVoice v2): config, checkpoint layout, module, generation and loading."""

from engine_ref.indextts2.gpt.config import INDEXTTS2_GPT, GPTv2Config, parse_gpt_v2
from engine_ref.indextts2.gpt.generate import (
    V2_GENERATION_DEFAULTS,
    final_emovec,
    generate_codes,
    generation_prefix,
    latent_pass_v2,
    make_conds,
    v2_generation_params,
)
from engine_ref.indextts2.gpt.layout import gpt_v2_layout, gpt_v2_shapes
from engine_ref.indextts2.gpt.load import build_gpt_v2, load_gpt_v2
from engine_ref.indextts2.gpt.model import UnifiedVoiceV2, upstream_lengths

__all__ = [
    "GPTv2Config", "INDEXTTS2_GPT", "parse_gpt_v2", "gpt_v2_layout", "gpt_v2_shapes", "UnifiedVoiceV2",
    "upstream_lengths", "build_gpt_v2", "load_gpt_v2", "final_emovec", "make_conds", "generation_prefix",
    "generate_codes", "latent_pass_v2", "V2_GENERATION_DEFAULTS", "v2_generation_params",
]
