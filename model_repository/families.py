"""Which Triton models each model family's repository holds: the registry the shared builder reads.

The builder (model_repository/builder.py) writes every family's repository from the same templates; what differs
per family is listed here, once: the export components it needs, the entry models' class, the stateless graphs
served as leaves, the family's extra models (IndexTTS-2's `s2mel`), the decoder's settings and the options'
family defaults. The family comes from the export's manifest (`model.family`), never from a flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine_ref.errors import InputError
from engine_ref.families import FAMILY_NAMES, INDEXTTS, INDEXTTS2, INDEXTTS2_5
from engine_ref.indextts2.v25.languages import SUPPORTED_LANGUAGES
from model_repository import contract as c

__all__ = ["FamilyModels", "FAMILY_MODELS", "family_of", "family_models"]


@dataclass(frozen=True)
class FamilyModels:
    family: str
    #: export components the repository needs (the build fails naming the missing ones)
    required: tuple[str, ...]
    #: module and class of the entry models (tts, tts_offline)
    entry: tuple[str, str]
    #: stateless graphs served one request at a time (onnx_leaf on cpu, native backends on gpu), by component name
    leaves: tuple[str, ...]
    #: family-only models (written by the builder's `_extra_model`)
    extra: tuple[str, ...] = ()
    #: decoder model parameters
    decoder_params: dict[str, str] = field(default_factory=dict)
    #: reference audio longer than this is cut (seconds) unless RepoOptions says otherwise
    max_reference_seconds: float = 50.0
    #: takes EMO_TEXT (emotion described in words): the gateway maps OpenAI's `instructions` to it
    text_emotion: bool = False
    #: LANGUAGE values the family takes (IndexTTS-2.5: required, it has no detection); () for families without it.
    #: Written into the entry models' config so the gateway can apply its default and name the choices.
    languages: tuple[str, ...] = ()
    #: the preprocess model's family-only inputs and outputs (IndexTTS-2.5: LANGUAGE in, SEGMENT_LANG_IDS out)
    preprocess_inputs: tuple[c.Field, ...] = ()
    preprocess_outputs: tuple[c.Field, ...] = ()


FAMILY_MODELS: dict[str, FamilyModels] = {
    INDEXTTS: FamilyModels(
        family=INDEXTTS,
        required=("cond_encoder", "gpt_prefill", "gpt_decode", "vocoder"),
        entry=("model_repository.models.tts", "TtsModel"),
        leaves=(c.COND_ENCODER, c.VOCODER),
    ),
    INDEXTTS2: FamilyModels(
        family=INDEXTTS2,
        required=("semantic_encoder", "semantic_codec", "campplus", "speaker_conditioner", "emotion_conditioner",
                  "gpt_prefill", "gpt_decode", "s2mel_prompt", "s2mel_cond", "cfm_estimator", "vocoder"),
        entry=("model_repository.models.indextts2_tts", "TtsModelV2"),
        # semantic_vq2emb is not served: s2mel_cond holds vq2emb + gpt_layer + the regulator in one graph.
        leaves=("semantic_encoder", "semantic_codec", "campplus", "speaker_conditioner", "emotion_conditioner",
                "s2mel_prompt", "s2mel_cond", c.VOCODER),
        extra=(c.S2MEL,),
        decoder_params={"remove_long_silence": "0"},  # infer_v2 keeps every code
        max_reference_seconds=15.0,  # upstream HEAD's cut (the reference release used whole files)
        text_emotion=True,
    ),
    INDEXTTS2_5: FamilyModels(
        family=INDEXTTS2_5,
        required=("semantic_encoder", "campplus", "speaker_projection", "emotion_conditioner", "gpt_prefill",
                  "gpt_decode", "codec_decoder", "s2mel_prompt", "s2mel_cond", "cfm_estimator", "vocoder"),
        entry=("model_repository.models.indextts25_tts", "TtsModelV25"),
        leaves=("semantic_encoder", "campplus", "speaker_projection", "emotion_conditioner", "codec_decoder",
                "s2mel_prompt", "s2mel_cond", c.VOCODER),
        extra=(c.S2MEL,),
        # infer_v2_5 keeps every code and reads no GPT latents: the decoder skips its latent pass
        decoder_params={"remove_long_silence": "0", "latent_pass": "0"},
        max_reference_seconds=15.0,  # 2.5 always cuts references at 15 s
        text_emotion=True,
        languages=SUPPORTED_LANGUAGES,
        preprocess_inputs=(c.LANGUAGE,),
        preprocess_outputs=(c.SEGMENT_LANG_IDS,),
    ),
}


def family_of(manifest_model: dict) -> str:
    """The family an export's manifest names (1.x manifests older than the field are IndexTTS 1.x)."""
    return str(manifest_model.get("family") or INDEXTTS)


def family_models(family: str) -> FamilyModels:
    spec = FAMILY_MODELS.get(family)
    if spec is None:
        name = FAMILY_NAMES.get(family, family)
        served = ", ".join(FAMILY_NAMES[f] for f in FAMILY_MODELS)
        raise InputError(f"the export is {name}, which the serving repository does not support yet",
                         f"export an {served} model")
    return spec
