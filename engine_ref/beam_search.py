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
Each prompt of a batch keeps its own beams, scorer and generator, and leaves the batch once done.
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
class _Prompt:
    index: int
    params: GenerationParams
    rows: RowParams
    generator: torch.Generator | None
    hyps: _Hypotheses
    beam_scores: torch.Tensor
    beams: list[list[int]]
    seen: torch.Tensor
    done: bool = False


@torch.inference_mode()
def decode_beams(
    model: UnifiedVoice,
    conds: torch.Tensor,
    text_ids: Sequence[Sequence[int]],
    params: Sequence[GenerationParams],
    seeds: Sequence[int],
) -> list[DecodeOutput]:
    cfg = model.cfg
    vocab, stop = cfg.number_mel_codes, cfg.stop_mel_token
    embeds, valid = build_prefix(model, conds, text_ids)
    hidden, past = model.decode(embeds, valid)
    # Expand every prompt to its beams (rows of one prompt are contiguous).
    expand = torch.tensor([i for i, p in enumerate(params) for _ in range(p.num_beams)])
    past, valid, last = _select_rows(past, expand), valid[expand], hidden[expand, -1]
    prompts: list[_Prompt] = []
    for i, (p, s) in enumerate(zip(params, seeds)):
        scores = torch.zeros(p.num_beams)
        if not p.do_sample:
            scores[1:] = -1e9  # only the first of identical beams may expand at step 1
        prompts.append(
            _Prompt(
                index=i, params=p, rows=RowParams.stack([p] * p.num_beams, min_tokens_to_keep=2 if p.num_beams > 1 else 1),
                generator=make_generator(s) if p.do_sample else None,
                hyps=_Hypotheses(p.num_beams, p.length_penalty), beam_scores=scores,
                beams=[[] for _ in range(p.num_beams)],
                seen=initial_seen(p.num_beams, vocab, cfg.start_mel_token),
            )
        )
    outputs: list[DecodeOutput | None] = [None] * len(params)
    live = list(prompts)
    step = 0
    while live:
        step += 1
        logprobs = torch.log_softmax(model.mel_logits(last), dim=-1)
        row_sel: list[int] = []  # rows of the next step, as indices into the current batch
        next_tokens: list[int] = []
        still: list[_Prompt] = []
        offset = 0
        for pr in live:
            nb = pr.params.num_beams
            scores = process(logprobs[offset : offset + nb], pr.seen, pr.rows, warp=pr.params.do_sample)
            total = (scores + pr.beam_scores.unsqueeze(1)).view(-1)
            if pr.params.do_sample:
                cand = torch.multinomial(total.softmax(dim=0), 2 * nb, generator=pr.generator)
                cand_scores = total[cand]
                cand_scores, order = torch.sort(cand_scores, descending=True)
                cand = cand[order]
            else:
                cand_scores, cand = torch.topk(total, 2 * nb)
            new_scores, new_beams, new_src, new_tok = [], [], [], []
            for rank, (flat, sc) in enumerate(zip(cand.tolist(), cand_scores.tolist())):
                src, tok = divmod(flat, vocab)
                if tok == stop:
                    if rank < nb:
                        pr.hyps.add(list(pr.beams[src]), sc, step, stopped=True)
                    continue
                new_scores.append(sc)
                new_beams.append(pr.beams[src] + [tok])
                new_src.append(src)
                new_tok.append(tok)
                if len(new_beams) == nb:
                    break
            pr.done = pr.hyps.is_done(float(cand_scores.max()), step)
            if not pr.done and step >= pr.params.max_mel_tokens:
                for codes, sc in zip(new_beams, new_scores):
                    pr.hyps.add(codes, sc, len(codes), stopped=False)
                pr.done = True
            if pr.done:
                codes, stopped = pr.hyps.best()
                outputs[pr.index] = DecodeOutput(codes=codes, stopped=stopped)
            else:
                src_t = torch.tensor(new_src)
                pr.beam_scores = torch.tensor(new_scores)
                pr.beams = new_beams
                pr.seen = pr.seen[src_t]
                pr.seen[torch.arange(nb), torch.tensor(new_tok)] = True
                row_sel.extend(offset + s for s in new_src)
                next_tokens.extend(new_tok)
                still.append(pr)
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
