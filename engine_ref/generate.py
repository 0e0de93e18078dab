"""Autoregressive mel-code generation and the teacher-forced latent pass of IndexTTS 1.x.

Sequence layout (identical to upstream for a single segment):
    prefill:  [32 conditioning latents | text_emb([start_text] + ids + [stop_text]) | mel_emb(start_mel) @ pos 0]
    step k:   mel_emb(code_k) @ mel position k + 1   (upstream's HF attention-mask arithmetic skips position 1)
    latents:  [conds | text_emb(...) | mel_emb([start_mel] + codes + [stop_mel]) @ positions 0..n+1],
              final_norm over the mel part, dropping the last two positions -> one latent per code.

Batches are left-padded with a key mask (see UnifiedVoice), so each segment decodes exactly as it would alone;
upstream's infer_fast right-pads text with stop tokens without a mask, which alters short rows — we do not
reproduce that artefact. Each row samples from its own seeded generator, so batching never changes its draws.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from engine_ref.modules.gpt2 import KV
from engine_ref.modules.unified_voice import UnifiedVoice
from engine_ref.sampling import GenerationParams, RowParams, initial_seen, make_generator, select_next

log = logging.getLogger("engine_ref.generate")

SILENT_TOKEN = 52
SILENCE_TRIGGER = 30  # upstream's max_consecutive: the TOTAL count of silent codes above which runs are shrunk
SILENCE_KEEP = 10  # silent codes kept per run when shrinking


@dataclass
class DecodeOutput:
    """Codes of one segment, without the stop code. `stopped` is False when max_mel_tokens cut it short."""

    codes: list[int]
    stopped: bool
    # Hidden states (before final_norm) at each decoded input position, only when asked for (tests).
    hidden: list[torch.Tensor] = field(default_factory=list, repr=False)


def generation_ids(ids: Sequence[int], start_text: int, stop_text: int) -> list[int]:
    """Upstream drops start/stop text ids from the text before wrapping it for generation."""
    return [i for i in ids if i != start_text and i != stop_text]


def _pad_left(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_i, D] rows into [B, L, D] with zeros on the left, plus the [B, L] validity mask."""
    width = max(r.shape[0] for r in rows)
    out = torch.stack([F.pad(r, (0, 0, width - r.shape[0], 0)) for r in rows])
    valid = torch.stack(
        [torch.arange(width) >= width - r.shape[0] for r in rows]
    ).to(out.device)
    return out, valid


def _text_rows(model: UnifiedVoice, conds: torch.Tensor, text_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    cfg = model.cfg
    rows = []
    for i, ids in enumerate(text_ids):
        wrapped = torch.tensor([cfg.start_text_token, *ids, cfg.stop_text_token], dtype=torch.long).unsqueeze(0)
        rows.append(torch.cat([conds[i if conds.shape[0] > 1 else 0], model.text_embeds(wrapped)[0]], dim=0))
    return rows


def build_prefix(
    model: UnifiedVoice, conds: torch.Tensor, text_ids: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill embeddings [B, P, D] and key mask [B, P] for generation (ids already cleaned)."""
    start = model.mel_embeds(
        torch.tensor([[model.cfg.start_mel_token]]), torch.tensor([[0]])
    )[0]
    return _pad_left([torch.cat([row, start], dim=0) for row in _text_rows(model, conds, text_ids)])


def _select_rows(past: list[KV], idx: torch.Tensor) -> list[KV]:
    return [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in past]


@torch.inference_mode()
def decode_sampling(
    model: UnifiedVoice,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    params: Sequence[GenerationParams],
    seeds: Sequence[int],
    keep_hidden: bool = False,
) -> list[DecodeOutput]:
    """Greedy or sampled decoding (num_beams == 1) of a batch of segments; rows leave as soon as they finish."""
    cfg = model.cfg
    n = len(text_ids)
    embeds, valid = build_prefix(model, conds, text_ids)
    hidden, past = model.decode(embeds, valid)
    last = hidden[:, -1]
    rows = RowParams.stack(list(params))
    do_sample = torch.tensor([p.do_sample for p in params])
    gens: list[torch.Generator | None] = [make_generator(s) if p.do_sample else None for p, s in zip(params, seeds)]
    limits = [p.max_mel_tokens for p in params]
    seen = initial_seen(n, cfg.number_mel_codes, cfg.start_mel_token)
    outputs = [DecodeOutput(codes=[], stopped=False) for _ in range(n)]
    alive = list(range(n))  # batch row -> output index
    step = 0
    while alive:
        step += 1
        if keep_hidden:
            for r, o in enumerate(alive):
                outputs[o].hidden.append(last[r].clone())
        tokens = select_next(model.mel_logits(last), seen, rows, do_sample, gens)
        keep: list[int] = []
        for r, o in enumerate(alive):
            tok = int(tokens[r])
            if tok == cfg.stop_mel_token:
                outputs[o].stopped = True
                continue
            outputs[o].codes.append(tok)
            seen[r, tok] = True
            if step < limits[o]:
                keep.append(r)
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep)
            past, valid, seen = _select_rows(past, idx), valid[idx], seen[idx]
            rows, do_sample, tokens = rows.select(idx), do_sample[idx], tokens[idx]
            gens = [gens[r] for r in keep]
            alive = [alive[r] for r in keep]
        emb = model.mel_embeds(tokens.unsqueeze(1), torch.full((len(alive), 1), step + 1))
        valid = torch.cat([valid, torch.ones(len(alive), 1, dtype=torch.bool)], dim=1)
        hidden, past = model.decode(emb, valid, past)
        last = hidden[:, -1]
    return outputs


def remove_long_silence(codes: list[int]) -> list[int]:
    """Upstream's fix for runaway silence: when more than 30 silent codes occur in total, keep at most 10 per run."""
    if sum(1 for c in codes if c == SILENT_TOKEN) <= SILENCE_TRIGGER:
        return list(codes)
    out: list[int] = []
    run = 0
    for c in codes:
        if c != SILENT_TOKEN:
            out.append(c)
            run = 0
        elif run < SILENCE_KEEP:
            out.append(c)
            run += 1
    return out


class SilenceFilter:
    """`remove_long_silence` applied online, for streaming: feed codes as they are generated and receive the
    cleaned codes as soon as they are certain, so that the concatenation equals remove_long_silence(all codes).

    The rule depends on the whole sequence (trimming starts only once more than SILENCE_TRIGGER silent codes
    occur in total), but it can change nothing while every silent run is at most SILENCE_KEEP long: codes pass
    straight through until a run first grows past that, are held from there until the total passes the trigger
    (from then on trimming is certain and applied online) or the sequence ends (then nothing is trimmed).
    """

    def __init__(self) -> None:
        self.total_silent = 0
        self.run = 0  # consecutive silent codes so far (raw), as remove_long_silence counts them (capped)
        self.triggered = False
        self.pending: list[int] = []

    def _trimmed(self, codes: list[int]) -> list[int]:
        out = []
        for c in codes:
            if c != SILENT_TOKEN:
                out.append(c)
                self.run = 0
            elif self.run < SILENCE_KEEP:
                out.append(c)
                self.run += 1
        return out

    def feed(self, code: int) -> list[int]:
        """The codes that became certain with this one (possibly none)."""
        if self.triggered:
            return self._trimmed([code])
        silent = code == SILENT_TOKEN
        self.total_silent += silent
        if self.pending or (silent and self.run >= SILENCE_KEEP):
            self.pending.append(code)
            if self.total_silent > SILENCE_TRIGGER:
                self.triggered = True
                held, self.pending = self.pending, []
                self.run = SILENCE_KEEP  # the run that started holding had reached the cap
                return self._trimmed(held)
            return []
        if self.total_silent > SILENCE_TRIGGER:  # trimming is now certain; nothing before needed it
            self.triggered = True
            return self._trimmed([code])
        self.run = self.run + 1 if silent else 0
        return [code]

    def finish(self) -> list[int]:
        """The rest, at the end of the sequence (held codes stay when the trigger was never reached)."""
        held, self.pending = self.pending, []
        return held


@torch.inference_mode()
def latent_pass(
    model: UnifiedVoice,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    codes: Sequence[Sequence[int]],
    mel_positions: Sequence[Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    """Teacher-forced pass producing one latent [n_i, D] per code (text ids uncleaned, as upstream).

    `mel_positions` overrides the positions 0..n+1 of [start, codes..., stop]; tests use it to line the pass up with
    the positions the autoregressive decoder used.
    """
    cfg = model.cfg
    rows = []
    for i, (text_row, c) in enumerate(zip(_text_rows(model, conds, text_ids), codes)):
        mel = torch.tensor([[cfg.start_mel_token, *c, cfg.stop_mel_token]], dtype=torch.long)
        pos = torch.arange(mel.shape[1]) if mel_positions is None else torch.tensor(list(mel_positions[i]))
        rows.append(torch.cat([text_row, model.mel_embeds(mel, pos.unsqueeze(0))[0]], dim=0))
    embeds, valid = _pad_left(rows)
    hidden, _ = model.decode(embeds, valid)
    lat = model.latents(hidden)
    out = []
    for i, c in enumerate(codes):
        n = len(c)
        out.append(lat[i, lat.shape[1] - (n + 2) : lat.shape[1] - 2])
    return out
