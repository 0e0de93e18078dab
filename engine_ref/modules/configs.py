"""Architecture settings of the building blocks the IndexTTS families share (GPT-2 decoder, Conformer +
Perceiver conditioning, BigVGAN), as typed dataclasses; each family's config parser fills them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConditionModuleConfig:
    """Conformer encoder + perceiver resampler settings (gpt.condition_module)."""

    output_size: int
    linear_units: int
    attention_heads: int
    num_blocks: int
    input_layer: str
    perceiver_mult: int = 2


class GPTTableSizes:
    """Embedding-table sizes every UnifiedVoice generation derives the same way from its gpt: keys (a mixin for
    the families' GPT configs, which must have max_mel_tokens, max_conditioning_inputs, max_text_tokens and
    number_text_tokens)."""

    max_mel_tokens: int
    max_conditioning_inputs: int
    max_text_tokens: int
    number_text_tokens: int

    @property
    def mel_positions(self) -> int:
        """Rows of mel_pos_embedding: max_mel_tokens + 2 + max_conditioning_inputs (1818 for IndexTTS2)."""
        return self.max_mel_tokens + 2 + self.max_conditioning_inputs

    @property
    def text_positions(self) -> int:
        """Rows of text_pos_embedding: max_text_tokens + 2 (602 for IndexTTS2)."""
        return self.max_text_tokens + 2

    @property
    def text_vocab(self) -> int:
        """Rows of text_embedding and text_head: number_text_tokens + 1 (12001 for IndexTTS2)."""
        return self.number_text_tokens + 1


@dataclass(frozen=True)
class GPTConfig(GPTTableSizes):
    """The UnifiedVoice GPT-2 decoder and its embeddings (gpt:)."""

    model_dim: int
    layers: int
    heads: int
    max_mel_tokens: int
    max_text_tokens: int
    number_text_tokens: int
    number_mel_codes: int
    start_mel_token: int
    stop_mel_token: int
    start_text_token: int
    stop_text_token: int
    condition_type: str
    condition_module: ConditionModuleConfig
    mel_length_compression: int = 1024
    use_mel_codes_as_input: bool = True
    train_solo_embeddings: bool = False
    max_conditioning_inputs: int = 1
    condition_num_latent: int = 32


@dataclass(frozen=True)
class BigVGANConfig:
    """The BigVGAN vocoder with its ECAPA-TDNN speaker encoder (bigvgan:)."""

    resblock: str
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    speaker_embedding_dim: int
    gpt_dim: int
    activation: str
    num_mels: int
    sampling_rate: int
    feat_upsample: bool = False
    cond_d_vector_in_each_upsampling_layer: bool = True
    snake_logscale: bool = True

    @property
    def hop_length(self) -> int:
        """Samples per latent frame: the product of the upsample rates (1024 for IndexTTS)."""
        n = 1
        for r in self.upsample_rates:
            n *= r
        return n
