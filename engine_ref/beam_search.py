"""Beam search and beam sampling with Hugging Face 4.36 semantics (IndexTTS 1.5's default is 3-beam sampling).

What matters for parity with the original:
- scores are log-softmax values; the repetition penalty (and, when sampling, temperature/top-k/top-p with at
  least 2 tokens kept) act on them, then each beam's running score is added;
- deterministic search takes the top 2*beams over beams x vocab, starting with only the first beam alive; beam
  sampling draws 2*beams candidates without replacement from all beams, which start equal;
- a stop candidate ranked outside the first `beams` is ignored; otherwise it closes a hypothesis scored
  sum_logprobs / generated_len ** length_penalty; a prompt is done when `beams` hypotheses exist and none of the
  running beams can beat the worst (early_stopping=False);
- at max length the running beams join the hypotheses, and the best one wins.

`BeamSearch` is the per-sequence state machine, independent of how logits are computed: engine_ref drives it with
the PyTorch decoder (`decode_beams`), the Triton decoder model with ONNX Runtime inside its continuous batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from engine_ref.generate import DecodeOutput, _select_rows, build_prefix
from engine_ref.modules.unified_voice import UnifiedVoice
from engine_ref.sampling import GenerationParams, RowParams, initial_seen, make_generator, process


@dataclass
class _Hypotheses:
    num_beams: int
    length_penalty: float
    items: list[tuple[float, list[int], bool]] = field(default_factory=list)  # (score, codes, ended with stop)
    worst: float = 1e9

    def add(self, codes: list[int], sum_logprobs: float, generated_len: int, stopped: bool) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self.items) < self.num_beams or score > self.worst:
            self.items.append((score, codes, stopped))
            if len(self.items) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_running: float, generated_len: int) -> bool:
        if len(self.items) < self.num_beams:
            return False
        return self.worst >= best_running / (generated_len**self.length_penalty)

    def best(self) -> tuple[list[int], bool]:
        _, codes, stopped = sorted(self.items, key=lambda x: x[0])[-1]
        return codes, stopped


@dataclass
class BeamStep:
    """What the caller must do next: keep row `sources[j]` (index among this sequence's rows) as new row j, fed
    with `tokens[j]`; or, when `done`, read `result`."""

    done: bool
    sources: list[int]
    tokens: list[int]
    result: DecodeOutput | None = None


class BeamSearch:
    """The beam state of one sequence: `num_beams` rows, advanced one step at a time from their logits."""

    def __init__(self, params: GenerationParams, seed: int, vocab: int, start_token: int, stop_token: int):
        nb = params.num_beams
        self.params = params
        self.stop = stop_token
        self.vocab = vocab
        self.rows = RowParams.stack([params] * nb, min_tokens_to_keep=2 if nb > 1 else 1)
        self.generator = make_generator(seed) if params.do_sample else None
        self.hyps = _Hypotheses(nb, params.length_penalty)
        self.scores = torch.zeros(nb)
        if not params.do_sample:
            self.scores[1:] = -1e9  # only the first of identical beams may expand at step 1
        self.beams: list[list[int]] = [[] for _ in range(nb)]
        self.seen = initial_seen(nb, vocab, start_token)
        self.step_count = 0

    @property
    def num_rows(self) -> int:
        return self.params.num_beams

    def step(self, logits: torch.Tensor) -> BeamStep:
        """logits [num_beams, vocab] of this sequence's rows (raw decoder output)."""
        self.step_count += 1
        step, nb = self.step_count, self.params.num_beams
        scores = process(torch.log_softmax(logits.float(), dim=-1), self.seen, self.rows, warp=self.params.do_sample)
        total = (scores + self.scores.unsqueeze(1)).view(-1)
        if self.params.do_sample:
            cand = torch.multinomial(total.softmax(dim=0), 2 * nb, generator=self.generator)
            cand_scores, order = torch.sort(total[cand], descending=True)
            cand = cand[order]
        else:
            cand_scores, cand = torch.topk(total, 2 * nb)
        new_scores, new_beams, sources, tokens = [], [], [], []
        for rank, (flat, sc) in enumerate(zip(cand.tolist(), cand_scores.tolist())):
            src, tok = divmod(flat, self.vocab)
            if tok == self.stop:
                if rank < nb:
                    self.hyps.add(list(self.beams[src]), sc, step, stopped=True)
                continue
            new_scores.append(sc)
            new_beams.append(self.beams[src] + [tok])
            sources.append(src)
            tokens.append(tok)
            if len(new_beams) == nb:
                break
        done = self.hyps.is_done(float(cand_scores.max()), step)
        if not done and step >= self.params.max_mel_tokens:
            for codes, sc in zip(new_beams, new_scores):
                self.hyps.add(codes, sc, len(codes), stopped=False)
            done = True
        if done:
            codes, stopped = self.hyps.best()
            return BeamStep(True, [], [], DecodeOutput(codes=codes, stopped=stopped))
        src_t = torch.tensor(sources)
        self.scores = torch.tensor(new_scores)
        self.beams = new_beams
        self.seen = self.seen[src_t]
        self.seen[torch.arange(nb), torch.tensor(tokens)] = True
        return BeamStep(False, sources, tokens)


@torch.inference_mode()
def decode_beams(
    model: UnifiedVoice,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    params: Sequence[GenerationParams],
    seeds: Sequence[int],
) -> list[DecodeOutput]:
    """Beam search for a batch of segments with the PyTorch decoder; each leaves the batch once done."""
    cfg = model.cfg
    embeds, valid = build_prefix(model, conds, text_ids)
    hidden, past = model.decode(embeds, valid)
    # Expand every prompt to its beams (rows of one prompt are contiguous).
    expand = torch.tensor([i for i, p in enumerate(params) for _ in range(p.num_beams)])
    past, valid, last = _select_rows(past, expand), valid[expand], hidden[expand, -1]
    searches = [BeamSearch(p, s, cfg.number_mel_codes, cfg.start_mel_token, cfg.stop_mel_token)
                for p, s in zip(params, seeds)]
    outputs: list[DecodeOutput | None] = [None] * len(params)
    live = list(range(len(params)))
    step = 0
    while live:
        step += 1
        logits = model.mel_logits(last)
        row_sel: list[int] = []
        next_tokens: list[int] = []
        still: list[int] = []
        offset = 0
        for i in live:
            nb = searches[i].num_rows
            out = searches[i].step(logits[offset : offset + nb])
            if out.done:
                outputs[i] = out.result
            else:
                row_sel.extend(offset + s for s in out.sources)
                next_tokens.extend(out.tokens)
                still.append(i)
            offset += nb
        live = still
        if not live:
            break
        idx = torch.tensor(row_sel)
        past, valid = _select_rows(past, idx), valid[idx]
        tokens = torch.tensor(next_tokens).unsqueeze(1)
        emb = model.mel_embeds(tokens, torch.full_like(tokens, step + 1))
        valid = torch.cat([valid, torch.ones(len(row_sel), 1, dtype=torch.bool)], dim=1)
        hidden, past = model.decode(emb, valid, past)
        last = hidden[:, -1]
    return [o for o in outputs if o is not None]
