"""One synthesis request as the exact tensors of model_repository/contract.py.

Every input but TEXT is optional and the server fills absent ones with IndexTTS 1.5's defaults, so the client
sends only what the caller set: `GenerationOverrides` keeps "not set" (None) apart from a value equal to the
default. That way a server-side default change reaches every client that did not ask otherwise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from engine_ref.errors import InputError
from engine_ref.params import GenerationParams
from model_repository import contract as c

__all__ = ["Controls", "GenerationOverrides", "ParamsLike", "VoiceSource", "TTSRequest", "read_voice"]

VoiceSource = Union[bytes, bytearray, memoryview, str, os.PathLike]
_INPUTS_BY_NAME = {f.name: f for f in c.REQUEST_INPUTS}
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class GenerationOverrides:
    """Generation settings the caller chose explicitly; None means "let the server decide".

    Field names are `GenerationParams`'s, restricted to those the contract can carry (`contract.PARAMS`).
    """

    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    max_mel_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.explicit().items():
            _check_value(name, value)

    @classmethod
    def of(cls, params: "ParamsLike") -> "GenerationOverrides":
        """Normalize what callers pass: None (nothing set), overrides, a mapping of fields, or a full
        `GenerationParams` (every field counts as set, except seed=None)."""
        if params is None:
            return cls()
        if isinstance(params, GenerationOverrides):
            return params
        if isinstance(params, GenerationParams):
            if params.length_penalty != GenerationParams().length_penalty:
                raise InputError(f"length_penalty={params.length_penalty!r} cannot be sent to the server "
                                 "(the serving contract has no such input)",
                                 "leave length_penalty at 0.0, IndexTTS 1.5's value")
            values = {name: getattr(params, name) for name in c.PARAMS}
            return cls(**{k: v for k, v in values.items() if v is not None})
        if isinstance(params, Mapping):
            unknown = sorted(set(params) - set(c.PARAMS))
            if unknown:
                raise InputError(f"unknown generation parameter(s): {', '.join(map(str, unknown))}",
                                 f"use only: {', '.join(c.PARAMS)}")
            return cls(**{k: v for k, v in params.items() if v is not None})
        raise InputError(f"generation parameters must be GenerationParams, GenerationOverrides or a dict, "
                         f"got {type(params).__name__}", "pass GenerationOverrides(temperature=0.7, ...)")

    def explicit(self) -> dict[str, Any]:
        """The fields that are set, in contract order."""
        return {name: getattr(self, name) for name in c.PARAMS if getattr(self, name) is not None}

    def resolved(self, base: GenerationParams | None = None) -> GenerationParams:
        """The full parameters the server will use if its defaults are `base` (IndexTTS 1.5's when None)."""
        return GenerationParams(**{**(base or GenerationParams()).__dict__, **self.explicit()})


ParamsLike = Union[GenerationParams, GenerationOverrides, Mapping[str, Any], None]


def _check_value(name: str, value: Any) -> None:
    """Type and representability checks; the server checks ranges (it knows the model's limits)."""
    kind = c.PARAMS[name].triton_type
    if kind == "BOOL":
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"{name}={value!r} must be true or false", f"pass {name} as a bool")
        return
    if kind.startswith("INT"):
        lo, hi = _INT32 if kind == "INT32" else _INT64
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise InputError(f"{name}={value!r} must be an integer in [{lo}, {hi}]", f"pass {name} as a whole number")
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise InputError(f"{name}={value!r} must be a finite number", f"pass {name} as a number such as 0.8")


@dataclass(frozen=True)
class Controls:
    """Request inputs beyond text, voice and generation: chunk sizes (every family), IndexTTS-2's emotion controls
    and pause length (2.0 and 2.5), IndexTTS-2.5's language and duration factor. None means "the server's default"
    (2.5 has none for the language: it refuses a request without one); a server of another family refuses each
    family-only input by name, so nothing asked for is dropped silently. Ranges are the server's to check."""

    chunk_first_codes: int | None = None  # codes in a segment's first streamed chunk; 0: one chunk per segment
    chunk_max_codes: int | None = None
    emotion_audio: bytes | None = None  # an emotion reference recording (IndexTTS-2)
    emo_alpha: float | None = None  # its weight in [0, 1]
    emo_vector: tuple[float, ...] | None = None  # 8 weights: happy, angry, sad, afraid, disgusted, melancholic,
    #                                              surprised, calm
    emo_text: str | None = None  # an emotion description for the text-emotion model
    emo_random: bool | None = None
    interval_silence_ms: int | None = None  # silence between segments
    language: str | None = None  # IndexTTS-2.5: the text's language (zh, en, ja, es, ar, zhen)
    duration_factor: float | None = None  # IndexTTS-2.5: s2mel length factor in [0.5, 2.0]

    def __post_init__(self) -> None:
        for name in ("chunk_first_codes", "chunk_max_codes", "interval_silence_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= _INT32[1]):
                raise InputError(f"{name}={v!r} must be a whole number >= 0", f"pass {name} as e.g. 16")
        if self.emo_alpha is not None:
            _check_value("temperature", self.emo_alpha)  # a finite number (the server checks [0, 1])
        if self.emo_vector is not None:
            vec = tuple(self.emo_vector)
            if len(vec) != c.EMO_VECTOR.dims[0]:
                raise InputError(f"emo_vector has {len(vec)} weights, not {c.EMO_VECTOR.dims[0]}",
                                 "pass 8 weights: happy, angry, sad, afraid, disgusted, melancholic, surprised, calm")
            for x in vec:
                _check_value("temperature", x)
        if self.emo_text is not None and (not isinstance(self.emo_text, str) or not self.emo_text.strip()):
            raise InputError("emo_text must be a non-empty string", "describe the emotion, e.g. 'calm and warm'")
        if self.emo_random is not None and not isinstance(self.emo_random, (bool, np.bool_)):
            raise InputError(f"emo_random={self.emo_random!r} must be true or false", "pass emo_random as a bool")
        if self.emotion_audio is not None and not self.emotion_audio:
            raise InputError("the emotion reference audio is empty (0 bytes)", "pass a recording, or leave it out")
        if self.language is not None and (not isinstance(self.language, str) or not self.language.strip()):
            raise InputError(f"language={self.language!r} must be a language code",
                             "pass one of zh, en, ja, es, ar, zhen (IndexTTS-2.5)")
        if self.duration_factor is not None:
            _check_value("temperature", self.duration_factor)  # a finite number (the server checks [0.5, 2.0])

    def values(self) -> dict[str, Any]:
        """Input name -> value for what is set."""
        pairs = ((c.CHUNK_FIRST_CODES, self.chunk_first_codes), (c.CHUNK_MAX_CODES, self.chunk_max_codes),
                 (c.EMOTION_AUDIO, self.emotion_audio), (c.EMO_ALPHA, self.emo_alpha),
                 (c.EMO_VECTOR, None if self.emo_vector is None else tuple(float(x) for x in self.emo_vector)),
                 (c.EMO_TEXT, None if self.emo_text is None else self.emo_text.encode("utf-8")),
                 (c.EMO_RANDOM, self.emo_random), (c.INTERVAL_SILENCE_MS, self.interval_silence_ms),
                 (c.LANGUAGE, None if self.language is None else self.language.strip().encode("utf-8")),
                 (c.DURATION_FACTOR, self.duration_factor))
        return {f.name: v for f, v in pairs if v is not None}


def read_voice(source: VoiceSource) -> bytes:
    """The reference audio's raw bytes (a path is read here; the server decodes and validates the audio)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "the reference audio bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = f"reference audio file {str(path)!r}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{where} does not exist", "check the path passed as --ref") from None
        except IsADirectoryError:
            raise InputError(f"{where} is a directory", "pass the path of an audio file") from None
        except OSError as exc:
            raise InputError(f"{where} cannot be read ({exc.strerror or exc})", "check the file permissions") from None
    else:
        raise InputError(f"reference audio must be bytes or a path, got {type(source).__name__}",
                         "pass the path of a WAV/FLAC/MP3 file or its bytes")
    if not data:
        raise InputError(f"{where} is empty (0 bytes)", "record or export the reference again")
    return data


@dataclass(frozen=True)
class TTSRequest:
    """Everything one request carries; `arrays()` turns it into the contract's tensors."""

    text: str
    reference_audio: bytes | None = None
    speaker_id: str | None = None
    params: GenerationOverrides = GenerationOverrides()
    max_text_tokens_per_segment: int | None = None
    stream: bool | None = None
    controls: Controls = Controls()

    @classmethod
    def build(cls, text: str, reference_audio: VoiceSource | None = None, speaker_id: str | None = None,
              params: ParamsLike = None, max_text_tokens_per_segment: int | None = None,
              stream: bool | None = None, controls: Controls | None = None) -> "TTSRequest":
        """Validate the caller's arguments (the checks the client can do without the model) and read the voice."""
        if not isinstance(text, str):
            raise InputError(f"text must be a string, got {type(text).__name__}", "pass the text as str")
        if not text.strip():
            raise InputError("the text is empty", "pass at least one word to speak")
        if reference_audio is None and not speaker_id:
            raise InputError("the request has no voice", "pass reference audio (--ref) or a speaker id the server "
                                                         "returned earlier (--speaker-id)")
        if speaker_id is not None and (not isinstance(speaker_id, str) or not speaker_id.strip()):
            raise InputError(f"speaker id {speaker_id!r} is not a non-empty string",
                             "pass the SPEAKER_ID a previous response returned")
        mtt = max_text_tokens_per_segment
        if mtt is not None and (isinstance(mtt, bool) or not isinstance(mtt, (int, np.integer)) or mtt < 1
                                or mtt > _INT32[1]):
            raise InputError(f"max_text_tokens_per_segment={mtt!r} must be a positive integer",
                             f"use a value such as {c.DEFAULT_MAX_TEXT_TOKENS_PER_SEGMENT} (the default)")
        voice = None if reference_audio is None else read_voice(reference_audio)
        return cls(text=text, reference_audio=voice, speaker_id=speaker_id, params=GenerationOverrides.of(params),
                   max_text_tokens_per_segment=None if mtt is None else int(mtt), stream=stream,
                   controls=controls or Controls())

    def values(self) -> dict[str, Any]:
        """Input name -> Python value, for the inputs that are set."""
        out: dict[str, Any] = {c.TEXT.name: self.text.encode("utf-8")}
        if self.reference_audio is not None:
            out[c.REFERENCE_AUDIO.name] = self.reference_audio
        if self.speaker_id is not None:
            out[c.SPEAKER_ID.name] = self.speaker_id.encode("utf-8")
        if self.stream is not None:
            out[c.STREAM.name] = bool(self.stream)
        if self.max_text_tokens_per_segment is not None:
            out[c.MAX_TEXT_TOKENS_PER_SEGMENT.name] = self.max_text_tokens_per_segment
        for attr, value in self.params.explicit().items():
            out[c.PARAMS[attr].name] = value
        out.update(self.controls.values())
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Input name -> numpy array with the contract's dtype and shape (BYTES as object arrays)."""
        arrays = {}
        for name, value in self.values().items():
            field = _INPUTS_BY_NAME[name]
            dtype = triton_to_np_dtype(field.client_type)
            values = list(value) if isinstance(value, tuple) else [value]
            arrays[name] = np.array(values, dtype=dtype).reshape(field.dims)
        return arrays

    def infer_inputs(self, infer_input_cls: type) -> list:
        """tritonclient InferInput objects (grpc or http module's class; http sends binary data)."""
        inputs = []
        for name, arr in self.arrays().items():
            inp = infer_input_cls(name, list(arr.shape), _INPUTS_BY_NAME[name].client_type)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs
