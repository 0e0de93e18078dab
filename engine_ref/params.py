"""Generation parameters of one request, shared by every family, the Triton contract and the client.

Torch-free on purpose: the client installs without torch and the serving contract imports these definitions to
name, default and range-check the request inputs exactly as engine_ref does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol, Union

from engine_ref.errors import InputError

MAX_BEAMS = 16
#: Below this, sampling is greedy up to ties, and scores divided by it can overflow float32 (1e-38 gave NaN
#: probabilities): such requests are refused and pointed at DO_SAMPLE=false.
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0


class _HasMaxMelTokens(Protocol):
    max_mel_tokens: int


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings of one request (defaults: upstream IndexTTS 1.5 infer())."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 30
    repetition_penalty: float = 10.0
    num_beams: int = 3
    length_penalty: float = 0.0
    max_mel_tokens: int = 600
    seed: int | None = None

    @classmethod
    def greedy(cls, **overrides) -> "GenerationParams":
        """Deterministic decoding: no sampling, one beam (the repetition penalty still applies, as in HF)."""
        return cls(**{"do_sample": False, "num_beams": 1, **overrides})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def validate(self, limits: Union[_HasMaxMelTokens, int], max_beams: int = MAX_BEAMS) -> None:
        """Raise InputError naming the parameter, its allowed range and the value given.

        `limits` is the model's GPT config (anything with `max_mel_tokens`) or that number itself. Every bound
        keeps the decoding arithmetic finite: a request that passes cannot make a sampling step produce NaN.
        """
        max_mel = limits if isinstance(limits, int) else limits.max_mel_tokens

        def bad(name: str, rule: str) -> InputError:
            return InputError(f"{name}={getattr(self, name)!r} is out of range", f"pass a {name} {rule}")

        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "that is a finite number")
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (for greedy decoding send "
                                     "do_sample=false instead of a tiny temperature)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", ">= 0 (0 disables top-k)")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"in (0, {MAX_REPETITION_PENALTY:g}]")
        if not 1 <= self.num_beams <= max_beams:
            raise bad("num_beams", f"between 1 and {max_beams}")
        if not -10 <= self.length_penalty <= 10:
            raise bad("length_penalty", "in [-10, 10]")
        if not 1 <= self.max_mel_tokens <= max_mel:
            raise bad("max_mel_tokens", f"between 1 and {max_mel} (the model's gpt.max_mel_tokens)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "in [0, 2**63)")


def segment_seed(seed: int, segment_index: int) -> int:
    """Independent, reproducible stream per segment, whatever bucket the segment lands in."""
    return (seed * 0x9E3779B97F4A7C15 + segment_index * 0xBF58476D1CE4E5B9) % (2**63 - 1)
