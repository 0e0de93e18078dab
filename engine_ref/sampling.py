"""Token selection shared by engine_ref, the Triton decoder model and tests.

Semantics follow Hugging Face transformers 4.36 (the version IndexTTS 1.5 pins), so that a request gets what the
original `generate()` would give it:
- greedy and sampling apply the processors to the raw logits: repetition penalty, then (sampling only)
  temperature, top-k, top-p;
- beam search applies the same processors to log-softmax scores (see engine_ref/beam_search.py);
- the repetition penalty sees every id of the prompt, and IndexTTS's prompt ids are placeholders: mel code 1
  (filler) and the start code, so those two are penalised from the first step.

Every processor is vectorised over rows with per-row parameters, so one batch can serve requests with different
settings; a parameter at its neutral value is an exact no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_ref.params import MAX_BEAMS, GenerationParams  # noqa: F401  (re-exported: the decoding code names it here)

# HF's placeholder prompt is all ones plus the start code: both count as "seen" for the repetition penalty.
PLACEHOLDER_PROMPT_ID = 1


@dataclass(frozen=True)
class RowParams:
    """Per-row processor parameters as tensors [N] (one row per sequence or beam)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    min_tokens_to_keep: int = 1

    @classmethod
    def stack(cls, params: list[GenerationParams], min_tokens_to_keep: int = 1) -> "RowParams":
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            repetition_penalty=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
            min_tokens_to_keep=min_tokens_to_keep,
        )

    def select(self, rows: torch.Tensor) -> "RowParams":
        return RowParams(
            self.temperature[rows], self.top_k[rows], self.top_p[rows], self.repetition_penalty[rows],
            self.min_tokens_to_keep,
        )


def initial_seen(rows: int, vocab: int, start_token: int) -> torch.Tensor:
    """The ids of IndexTTS's placeholder prompt, as a [rows, vocab] mask for the repetition penalty."""
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    seen[:, PLACEHOLDER_PROMPT_ID] = True
    seen[:, start_token] = True
    return seen


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor: seen scores < 0 are multiplied by the penalty, others divided."""
    p = penalty.to(scores.dtype).unsqueeze(1)
    penalised = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(seen, penalised, scores)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return scores / temperature.to(scores.dtype).unsqueeze(1)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """HF TopKLogitsWarper per row; k = 0 disables. Ties at the k-th value are kept, as in HF."""
    vocab = scores.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(min=min_tokens_to_keep), torch.full_like(top_k, vocab)).clamp(max=vocab)
    kmax = int(k.max())
    kth = torch.topk(scores, kmax, dim=1).values.gather(1, (k - 1).unsqueeze(1))
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: torch.Tensor, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """HF TopPLogitsWarper per row: drop the low tail whose cumulative probability is <= 1 - top_p."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=1)
    cum = sorted_scores.softmax(dim=1).cumsum(dim=1)
    remove = cum <= (1 - top_p.to(scores.dtype)).unsqueeze(1)
    remove[:, -min_tokens_to_keep:] = False
    # top_p == 1 is HF's "disabled": keep everything exactly as HF does by not applying it at all.
    remove &= (top_p < 1).unsqueeze(1)
    mask = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(mask, float("-inf"))


def process(scores: torch.Tensor, seen: torch.Tensor, rows: RowParams, warp: bool) -> torch.Tensor:
    """Repetition penalty, then (when sampling) temperature, top-k and top-p, in HF's order."""
    scores = apply_repetition_penalty(scores, seen, rows.repetition_penalty)
    if warp:
        scores = apply_temperature(scores, rows.temperature)
        scores = apply_top_k(scores, rows.top_k, rows.min_tokens_to_keep)
        scores = apply_top_p(scores, rows.top_p, rows.min_tokens_to_keep)
    return scores


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_rows(scores: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One multinomial draw per row, each from the row's own generator (so batching never changes a row's draw)."""
    probs = scores.float().softmax(dim=1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


def select_next(
    logits: torch.Tensor, seen: torch.Tensor, rows: RowParams, do_sample: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row for greedy/sampling rows (num_beams == 1). do_sample: [N] bool."""
    greedy_scores = process(logits, seen, rows, warp=False)
    out = greedy_scores.argmax(dim=1)
    if bool(do_sample.any()):
        idx = do_sample.nonzero().flatten()
        sub = process(logits[idx], seen[idx], rows.select(idx), warp=True)
        drawn = sample_rows(sub, [generators[int(i)] for i in idx])  # type: ignore[misc]
        out[idx] = drawn
    return out
