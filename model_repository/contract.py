"""The wire contract of the models clients call, shared by the Triton models, the repository builder and clients.

Entry points (model names), the only models clients may call:
- `tts` — decoupled: streams one response per segment, then an empty final response (gRPC streaming).
  Cancelling the stream (or disconnecting) stops the request's sequences within one decode step.
- `tts_offline` — one response with the whole utterance. This is what HTTP clients call (Triton's HTTP /infer
  does not serve decoupled models).
Both take the same inputs (REQUEST_INPUTS) and call the internal models themselves (IndexTTS 1.x: `preprocess`,
`cond_encoder`, `gpt_decoder`, `vocoder`; IndexTTS-2: `preprocess`, the reference graphs, `gpt_decoder`,
`s2mel_cond`, `s2mel`, `vocoder`). Internal models refuse requests without the server's internal key.

Every request input except TEXT is optional; absent parameters take the served family's upstream defaults
(IndexTTS 1.5's infer(), or IndexTTS-2's infer_v2: 3-beam sampling at T 0.8, 1500 codes).

Families (the repository serves the one its export's manifest names, `model.family`):
- IndexTTS 1.x: 24 kHz responses. The IndexTTS-2 inputs (V2_INPUTS) are refused by name with INVALID_ARGUMENT.
- IndexTTS-2: 22.05 kHz responses (SAMPLE_RATE says so in every response). Emotion control: EMOTION_AUDIO (an
  emotion reference; default the speaker's own recording) mixed by EMO_ALPHA in [0, 1], or an 8-weight EMO_VECTOR
  (happy, angry, sad, afraid, disgusted, melancholic, surprised, calm), or EMO_TEXT (the text-emotion model turns
  a description into the vector); EMO_RANDOM picks the emotion-bank rows at random (seeded by SEED) instead of by
  speaker similarity. INTERVAL_SILENCE_MS of zeros (default 200) end every segment but the last, so the chunks add
  up to upstream's whole utterance. The s2mel stage is not causal, so IndexTTS-2 streams ONE chunk per segment:
  CHUNK_FIRST_CODES / CHUNK_MAX_CODES are accepted (range-checked) and have no effect there.
- IndexTTS-2.5: as IndexTTS-2 (22.05 kHz, the same emotion inputs, one chunk per segment), plus LANGUAGE (required:
  zh, en, ja, es, ar or zhen; the model has no language detection and a missing or unknown one is refused, never
  defaulted) and DURATION_FACTOR in [0.5, 2.0] (default 1.0: the mel length is int(2N * 1.72 * factor) for N codes;
  the fp32 value is read as the shortest decimal that rounds to it, so 1.1 means 1.1). IndexTTS 1.x and IndexTTS-2
  servers refuse both by name (V25_INPUTS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine_ref.errors import InputError
from engine_ref.params import GenerationParams

STREAM_MODEL = "tts"
OFFLINE_MODEL = "tts_offline"
ENTRY_MODELS = (STREAM_MODEL, OFFLINE_MODEL)
PREPROCESS = "preprocess"
COND_ENCODER = "cond_encoder"
DECODER = "gpt_decoder"
VOCODER = "vocoder"
S2MEL = "s2mel"  # IndexTTS-2: the diffusion model that batches Euler steps across requests

DEFAULT_MAX_TEXT_CHARS = 20_000
DEFAULT_CHUNK_FIRST_CODES = 16
DEFAULT_CHUNK_MAX_CODES = 128
DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT = 120


@dataclass(frozen=True)
class Field:
    name: str
    triton_type: str  # config.pbtxt data_type without TYPE_ (STRING, FP32, INT32, INT64, BOOL, INT16)
    client_type: str  # tritonclient datatype (BYTES, FP32, ...)
    dims: tuple[int, ...] = (1,)
    optional: bool = True


# Request inputs of the entry models (tts, tts_offline).
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
# Chunked streaming (tts): the first chunk of a segment covers this many codes, each next one twice the previous
# up to CHUNK_MAX_CODES; 0 sends one chunk per segment. Absent: the repository's defaults.
CHUNK_FIRST_CODES = Field("CHUNK_FIRST_CODES", "INT32", "INT32")
CHUNK_MAX_CODES = Field("CHUNK_MAX_CODES", "INT32", "INT32")
# IndexTTS-2 only (see the module docstring); an IndexTTS 1.x server refuses each of them by name.
EMOTION_AUDIO = Field("EMOTION_AUDIO", "STRING", "BYTES")  # emotion reference recording (wav/flac/mp3 bytes)
EMO_ALPHA = Field("EMO_ALPHA", "FP32", "FP32")  # weight of EMOTION_AUDIO in [0, 1]
EMO_VECTOR = Field("EMO_VECTOR", "FP32", "FP32", dims=(8,))  # 8 emotion weights, each in [0, 1.2], sum <= 1.5
EMO_TEXT = Field("EMO_TEXT", "STRING", "BYTES")  # an emotion description for the text-emotion model
EMO_RANDOM = Field("EMO_RANDOM", "BOOL", "BOOL")  # emotion-bank rows at random (seeded) instead of by similarity
INTERVAL_SILENCE_MS = Field("INTERVAL_SILENCE_MS", "INT32", "INT32")  # zeros after every segment but the last
V2_INPUTS = (EMOTION_AUDIO, EMO_ALPHA, EMO_VECTOR, EMO_TEXT, EMO_RANDOM, INTERVAL_SILENCE_MS)
MAX_INTERVAL_SILENCE_MS = 10_000
# IndexTTS-2.5 only (see the module docstring); IndexTTS 1.x and IndexTTS-2 servers refuse each of them by name.
LANGUAGE = Field("LANGUAGE", "STRING", "BYTES")  # the text's language: zh, en, ja, es, ar, zhen (required for 2.5)
DURATION_FACTOR = Field("DURATION_FACTOR", "FP32", "FP32")  # s2mel length factor in [0.5, 2.0]
V25_INPUTS = (LANGUAGE, DURATION_FACTOR)
REQUEST_INPUTS = (TEXT, REFERENCE_AUDIO, SPEAKER_ID, STREAM, MAX_TEXT_TOKENS_PER_SEGMENT, CHUNK_FIRST_CODES,
                  CHUNK_MAX_CODES, *PARAMS.values(), *V2_INPUTS, *V25_INPUTS)

# Outputs of every response.
AUDIO = Field("AUDIO", "INT16", "INT16", dims=(-1,), optional=False)  # 16-bit PCM chunk, mono
SAMPLE_RATE = Field("SAMPLE_RATE", "INT32", "INT32", optional=False)
SEGMENT_INDEX = Field("SEGMENT_INDEX", "INT32", "INT32", optional=False)  # -1 on the non-streaming response
SEGMENT_COUNT = Field("SEGMENT_COUNT", "INT32", "INT32", optional=False)
IS_LAST = Field("IS_LAST", "BOOL", "BOOL", optional=False)  # the last audio chunk of the utterance
SPEAKER_ID_OUT = Field("SPEAKER", "STRING", "BYTES", optional=False)  # the speaker id: send it back as SPEAKER_ID instead of re-sending audio
INFO = Field("INFO", "STRING", "BYTES", optional=False)  # JSON: segment text, codes, warnings, timings
CHUNK_INDEX = Field("CHUNK_INDEX", "INT32", "INT32", optional=False)  # chunk number within its segment
SEGMENT_DONE = Field("SEGMENT_DONE", "BOOL", "BOOL", optional=False)  # the last chunk of its segment
SAMPLE_OFFSET = Field("SAMPLE_OFFSET", "INT64", "INT64", optional=False)  # where AUDIO starts in the utterance
RESPONSE_OUTPUTS = (AUDIO, SAMPLE_RATE, SEGMENT_INDEX, SEGMENT_COUNT, IS_LAST, SPEAKER_ID_OUT, INFO, CHUNK_INDEX,
                    SEGMENT_DONE, SAMPLE_OFFSET)

# tts -> preprocess (internal)
SEGMENT_IDS = Field("SEGMENT_IDS", "INT64", "INT64", dims=(-1,), optional=False)  # concatenated token ids
SEGMENT_LENGTHS = Field("SEGMENT_LENGTHS", "INT32", "INT32", dims=(-1,), optional=False)
SEGMENT_TEXTS = Field("SEGMENT_TEXTS", "STRING", "BYTES", dims=(-1,), optional=False)
PREPROCESS_OUTPUTS = (SEGMENT_IDS, SEGMENT_LENGTHS, SEGMENT_TEXTS)
# IndexTTS-2.5's preprocess also takes LANGUAGE and returns each segment's lang_embedding row
SEGMENT_LANG_IDS = Field("SEGMENT_LANG_IDS", "INT32", "INT32", dims=(-1,), optional=False)


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


def v2_inputs_present(values: dict[str, Any]) -> list[str]:
    """Names of the IndexTTS-2-only inputs a request carries (an IndexTTS 1.x server refuses them by name)."""
    return [f.name for f in V2_INPUTS if values.get(f.name) is not None]


def decode_text(value: Any) -> tuple[str, int]:
    """TEXT bytes as str and how many invalid UTF-8 sequences were replaced (reported back as a warning)."""
    if not isinstance(value, (bytes, bytearray, np.bytes_)):
        return str(value), 0
    raw = bytes(value)
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def info_json(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":"), default=str).encode()


# tts -> gpt_decoder (decoupled: one response per sequence, then the final flag)
SEQUENCE_ID = Field("SEQUENCE_ID", "STRING", "BYTES", optional=False)
CANCEL = Field("CANCEL", "BOOL", "BOOL")  # a control request: stop SEQUENCE_ID at the next step
CONDS = Field("CONDS", "FP32", "FP32", dims=(-1, -1))
TEXT_IDS = Field("TEXT_IDS", "INT64", "INT64", dims=(-1,))
TEXT_IDS_RAW = Field("TEXT_IDS_RAW", "INT64", "INT64", dims=(-1,))
STREAM_AT = Field("STREAM_AT", "INT32", "INT32", dims=(-1,))  # send partial results at these code counts
PRIORITY = Field("PRIORITY", "INT32", "INT32")  # admission order when queued: lower first (the segment index)
DECODER_INPUTS = (SEQUENCE_ID, CANCEL, CONDS, TEXT_IDS, TEXT_IDS_RAW, STREAM_AT, PRIORITY, *PARAMS.values())
CODES = Field("CODES", "INT64", "INT64", dims=(-1,), optional=False)
LATENTS = Field("LATENTS", "FP32", "FP32", dims=(-1, -1), optional=False)
STOPPED = Field("STOPPED", "BOOL", "BOOL", optional=False)
CANCELLED = Field("CANCELLED", "BOOL", "BOOL", optional=False)
GENERATED = Field("GENERATED", "INT32", "INT32", optional=False)
CODE_OFFSET = Field("CODE_OFFSET", "INT32", "INT32", optional=False)  # index of CODES[0] in the sequence
PARTIAL = Field("PARTIAL", "BOOL", "BOOL", optional=False)  # more responses follow for this sequence
DECODER_OUTPUTS = (CODES, LATENTS, STOPPED, CANCELLED, GENERATED, CODE_OFFSET, PARTIAL)

# tts -> s2mel (IndexTTS-2; decoupled: one response per request). CANCEL with SEQUENCE_ID stops it at the next step.
MU = Field("MU", "FP32", "FP32", dims=(-1, -1))  # [frames, content]: prompt condition ‖ target condition
PROMPT_MEL = Field("PROMPT_MEL", "FP32", "FP32", dims=(-1, -1))  # [mels, prompt frames]: the reference mel
STYLE = Field("STYLE", "FP32", "FP32", dims=(-1,))  # [style_dim]: the CAMPPlus style
NOISE_SEED = Field("NOISE_SEED", "INT64", "INT64")  # the segment's CFM noise generator seed
S2MEL_INPUTS = (SEQUENCE_ID, CANCEL, MU, PROMPT_MEL, STYLE, NOISE_SEED)
MEL = Field("MEL", "FP32", "FP32", dims=(-1, -1), optional=False)  # [mels, generated frames]
STEPS = Field("STEPS", "INT32", "INT32", optional=False)  # Euler steps the request took part in
S2MEL_OUTPUTS = (MEL, CANCELLED, STEPS)

#: Every internal model's extra input: the server's secret (model_repository/models/base.py).
INTERNAL_KEY = Field("INTERNAL_KEY", "STRING", "BYTES")
