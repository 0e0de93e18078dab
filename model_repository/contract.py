"""The wire contract of the models clients call, shared by the Triton models, the repository builder and clients.

Entry points (model names):
- `tts` — ensemble: `preprocess` (normalize, tokenize, segment) -> `tts_bls` (decoupled: streams one response per
  segment, then an empty final response). gRPC streaming.
- `tts_offline` — the same through the non-decoupled `tts_bls_offline`: one response with the whole utterance.
  This is what HTTP clients call (Triton's HTTP /infer does not serve decoupled models).
- `tts_bls` — also accepts TEXT directly (it then calls `preprocess` itself). Call it directly when request
  cancellation matters: Triton 2.51 does not propagate cancellation through ensembles.

Every request input except TEXT is optional; absent parameters take IndexTTS 1.5's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_ref.errors import InputError
from engine_ref.sampling import GenerationParams

ENSEMBLE_STREAM = "tts"
ENSEMBLE_OFFLINE = "tts_offline"
BLS_STREAM = "tts_bls"
BLS_OFFLINE = "tts_bls_offline"
PREPROCESS = "preprocess"
COND_ENCODER = "cond_encoder"
DECODER = "gpt_decoder"
VOCODER = "vocoder"

DEFAULT_MAX_TEXT_CHARS = 20_000
DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT = 120


@dataclass(frozen=True)
class Field:
    name: str
    triton_type: str  # config.pbtxt data_type without TYPE_ (STRING, FP32, INT32, INT64, BOOL, INT16)
    client_type: str  # tritonclient datatype (BYTES, FP32, ...)
    dims: tuple[int, ...] = (1,)
    optional: bool = True


# Request inputs of the tts models (the ensembles expose the same set).
TEXT = Field("TEXT", "STRING", "BYTES", optional=False)
REFERENCE_AUDIO = Field("REFERENCE_AUDIO", "STRING", "BYTES")
SPEAKER_ID = Field("SPEAKER_ID", "STRING", "BYTES")
STREAM = Field("STREAM", "BOOL", "BOOL")
PARAMS = {
    "temperature": Field("TEMPERATURE", "FP32", "FP32"),
    "top_p": Field("TOP_P", "FP32", "FP32"),
    "top_k": Field("TOP_K", "INT32", "INT32"),
    "repetition_penalty": Field("REPETITION_PENALTY", "FP32", "FP32"),
    "num_beams": Field("NUM_BEAMS", "INT32", "INT32"),
    "max_mel_tokens": Field("MAX_MEL_TOKENS", "INT32", "INT32"),
    "seed": Field("SEED", "INT64", "INT64"),
    "do_sample": Field("DO_SAMPLE", "BOOL", "BOOL"),
}
MAX_TEXT_TOKENS_PER_SEGMENT = Field("MAX_TEXT_TOKENS_PER_SEGMENT", "INT32", "INT32")
REQUEST_INPUTS = (TEXT, REFERENCE_AUDIO, SPEAKER_ID, STREAM, MAX_TEXT_TOKENS_PER_SEGMENT, *PARAMS.values())

# Outputs of every response.
AUDIO = Field("AUDIO", "INT16", "INT16", dims=(-1,), optional=False)  # 16-bit PCM chunk, mono
SAMPLE_RATE = Field("SAMPLE_RATE", "INT32", "INT32", optional=False)
SEGMENT_INDEX = Field("SEGMENT_INDEX", "INT32", "INT32", optional=False)  # -1 on the non-streaming response
SEGMENT_COUNT = Field("SEGMENT_COUNT", "INT32", "INT32", optional=False)
IS_LAST = Field("IS_LAST", "BOOL", "BOOL", optional=False)  # the last audio chunk of the utterance
SPEAKER_ID_OUT = Field("SPEAKER", "STRING", "BYTES", optional=False)  # the speaker id: send it back as SPEAKER_ID instead of re-sending audio
INFO = Field("INFO", "STRING", "BYTES", optional=False)  # JSON: segment text, codes, warnings, timings
RESPONSE_OUTPUTS = (AUDIO, SAMPLE_RATE, SEGMENT_INDEX, SEGMENT_COUNT, IS_LAST, SPEAKER_ID_OUT, INFO)

# preprocess -> tts_bls (inside the ensembles)
SEGMENT_IDS = Field("SEGMENT_IDS", "INT64", "INT64", dims=(-1,), optional=False)  # concatenated token ids
SEGMENT_LENGTHS = Field("SEGMENT_LENGTHS", "INT32", "INT32", dims=(-1,), optional=False)
SEGMENT_TEXTS = Field("SEGMENT_TEXTS", "STRING", "BYTES", dims=(-1,), optional=False)
PREPROCESS_OUTPUTS = (SEGMENT_IDS, SEGMENT_LENGTHS, SEGMENT_TEXTS)


def params_from_inputs(values: dict[str, Any], base: GenerationParams = GenerationParams()) -> GenerationParams:
    """GenerationParams from optional request scalars (field name -> numpy scalar or None); wrong types -> InputError."""
    kwargs = dict(base.__dict__)
    for attr, f in PARAMS.items():
        v = values.get(f.name)
        if v is None:
            continue
        arr = np.asarray(v).reshape(-1)
        if arr.size != 1:
            raise InputError(f"{f.name} must hold exactly one value, got {arr.size}", f"send {f.name} with shape [1]")
        x = arr[0]
        if f.triton_type == "BOOL":
            kwargs[attr] = bool(x)
        elif f.triton_type.startswith("INT"):
            kwargs[attr] = int(x)
        else:
            kwargs[attr] = float(x)
    return GenerationParams(**kwargs)


def info_json(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":"), default=str).encode()


# tts_bls -> gpt_decoder (decoupled: one response per sequence, then the final flag)
SEQUENCE_ID = Field("SEQUENCE_ID", "STRING", "BYTES", optional=False)
CANCEL = Field("CANCEL", "BOOL", "BOOL")  # a control request: stop SEQUENCE_ID at the next step
CONDS = Field("CONDS", "FP32", "FP32", dims=(-1, -1))
TEXT_IDS = Field("TEXT_IDS", "INT64", "INT64", dims=(-1,))
TEXT_IDS_RAW = Field("TEXT_IDS_RAW", "INT64", "INT64", dims=(-1,))
DECODER_INPUTS = (SEQUENCE_ID, CANCEL, CONDS, TEXT_IDS, TEXT_IDS_RAW, *PARAMS.values())
CODES = Field("CODES", "INT64", "INT64", dims=(-1,), optional=False)
LATENTS = Field("LATENTS", "FP32", "FP32", dims=(-1, -1), optional=False)
STOPPED = Field("STOPPED", "BOOL", "BOOL", optional=False)
CANCELLED = Field("CANCELLED", "BOOL", "BOOL", optional=False)
GENERATED = Field("GENERATED", "INT32", "INT32", optional=False)
DECODER_OUTPUTS = (CODES, LATENTS, STOPPED, CANCELLED, GENERATED)
