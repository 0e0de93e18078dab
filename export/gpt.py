"""ONNX export of the GPT decoder: a prefill graph and a decode-step graph sharing one KV layout.

KV layout (also recorded in the manifest's `extra`): per layer `past_key_values.{i}.key` / `.value` in,
`present.{i}.key` / `.value` out, float [batch, heads, seq, head_dim]; `present` = past + new positions.
Positions are explicit inputs and the attention mask marks valid keys, so padding may sit anywhere in the
sequence (GPT-2 here has no positional term inside attention): a batch of sequences with different lengths shares
one past length, padded, and each row computes exactly what it computes alone.

- gpt_prefill: conds [B, C, D], text_ids [B, L] (already wrapped in start/stop text tokens, left-padded),
  text_positions [B, L], attention_mask [B, C + L + 1] -> logits [B, V] of the start_mel position, hidden [B, D]
  (after ln_f and final_norm: the latent of that position), present.* (length C + L + 1). C = the conditioning
  rows ahead of the text (`cond_rows`): 32 latents for 1.x, 32 latents + 2 speed rows = 34 for IndexTTS2; the
  manifest's extra records it as `cond_rows` (and, for older readers, `num_latents`).
- gpt_decode: mel_tokens [B, T], mel_positions [B, T], attention_mask [B, P + T], past_key_values.* ->
  logits [B, V] of the last position, hidden [B, T, D] (after both final norms), present.*.
  T = 1 is a decode step; T > 1 replays codes teacher-forced, which is how the latent pass runs through the same graph.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine_ref.generate import build_prefix, decode_sampling
from engine_ref.indextts.loader import LoadedModel
from engine_ref.modules.unified_voice import UnifiedVoice
from engine_ref.sampling import GenerationParams
from export.common import FP32_TOLERANCE, ErrorMeter, ExportOptions, check_tolerance, dim, export_onnx, graph_io
from export.manifest import Component, Parity, component_digest

log = logging.getLogger("export.gpt")

PREFILL = "gpt_prefill"
DECODE = "gpt_decode"


def cond_rows(cfg) -> int:
    """Conditioning rows ahead of the text: `cfg.cond_rows` where the family defines it (IndexTTS2: 34), else the
    perceiver's latents (1.x: 32)."""
    return int(getattr(cfg, "cond_rows", cfg.condition_num_latent))


def kv_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class PrefillGraph(nn.Module):
    def __init__(self, uv: UnifiedVoice):
        super().__init__()
        self.uv = uv

    def text_rows(self, text_ids, text_positions):
        """Text embeddings [B, L, D]: token + position (IndexTTS-2.5's graph adds its language row here)."""
        return self.uv.text_embedding(text_ids) + self.uv.text_pos_embedding(text_positions)

    def forward(self, conds, text_ids, text_positions, attention_mask):
        uv = self.uv
        cfg = uv.cfg
        text = self.text_rows(text_ids, text_positions)
        start = uv.mel_embedding.weight[cfg.start_mel_token] + uv.mel_pos_embedding.emb.weight[0]
        start = start.reshape(1, 1, -1).expand(conds.shape[0], 1, conds.shape[2])
        x = torch.cat([conds, text, start], dim=1)
        hidden, presents = uv.gpt(x, attention_mask.bool())
        last = uv.final_norm(hidden[:, -1])
        return (uv.mel_head(last), last, *[t for kv in presents for t in kv])


class DecodeGraph(nn.Module):
    def __init__(self, uv: UnifiedVoice):
        super().__init__()
        self.uv = uv

    def forward(self, mel_tokens, mel_positions, attention_mask, *past_flat):
        uv = self.uv
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        hidden, presents = uv.gpt(uv.mel_embeds(mel_tokens, mel_positions), attention_mask.bool(), past)
        hidden = uv.final_norm(hidden)
        return (uv.mel_head(hidden[:, -1]), hidden, *[t for kv in presents for t in kv])


def _kv_extra(uv: UnifiedVoice) -> dict:
    cfg = uv.cfg
    return {
        "layers": cfg.layers,
        "heads": cfg.heads,
        "head_dim": cfg.model_dim // cfg.heads,
        "kv_layout": "[batch, heads, seq, head_dim]",
        "past_names": "past_key_values.{i}.key|value",
        "present_names": "present.{i}.key|value",
        "model_dim": cfg.model_dim,
        "num_latents": cond_rows(cfg),  # = cond_rows; the name older readers (models/decoder.py) use
        "cond_rows": cond_rows(cfg),
        "vocab": cfg.number_mel_codes,
        "start_mel_token": cfg.start_mel_token,
        "stop_mel_token": cfg.stop_mel_token,
        "start_text_token": cfg.start_text_token,
        "stop_text_token": cfg.stop_text_token,
        "max_mel_tokens": cfg.max_mel_tokens,
        "max_text_tokens": cfg.max_text_tokens,
        "text_vocab": cfg.text_vocab,
        "first_generated_position": 2,
    }


def _max_past(uv: UnifiedVoice) -> int:
    cfg = uv.cfg
    return cond_rows(cfg) + cfg.text_positions + cfg.mel_positions


def _example_prefill(uv: UnifiedVoice, batch: int, text_len: int, gen: torch.Generator):
    cfg = uv.cfg
    conds = torch.randn(batch, cond_rows(cfg), cfg.model_dim, generator=gen)
    ids = torch.randint(2, cfg.text_vocab, (batch, text_len), generator=gen)
    pos = torch.arange(text_len).repeat(batch, 1)
    mask = torch.ones(batch, cond_rows(cfg) + text_len + 1, dtype=torch.int64)
    return conds, ids, pos, mask


def export_prefill(model: LoadedModel, out_dir: Path, opts: ExportOptions, graph: PrefillGraph | None = None,
                   verifier=None) -> Component:
    """The prefill graph (`graph`: PrefillGraph(model.gpt) unless a family passes its own subclass), verified by
    `verifier(model, out_dir, comp, opts)` (default verify_prefill)."""
    uv = model.gpt
    cfg = uv.cfg
    path = out_dir / f"{PREFILL}.onnx"
    presents = kv_names(cfg.layers, "present")
    t0 = time.perf_counter()
    ext = export_onnx(
        graph or PrefillGraph(uv), _example_prefill(uv, 2, 7, torch.Generator().manual_seed(opts.seed)), path,
        ["conds", "text_ids", "text_positions", "attention_mask"], ["logits", "hidden", *presents],
        {"conds": {0: "batch"}, "text_ids": {0: "batch", 1: "text_len"}, "text_positions": {0: "batch", 1: "text_len"},
         "attention_mask": {0: "batch", 1: "prefix_len"}, "logits": {0: "batch"}, "hidden": {0: "batch"},
         **{n: {0: "batch", 2: "prefix_len"} for n in presents}},
        opts.opset,
    )
    log.info("exported %s in %.1f s", path.name, time.perf_counter() - t0)
    inputs, outputs = graph_io(path)
    prefix_max = cond_rows(cfg) + cfg.text_positions + 1
    comp = Component(
        name=PREFILL, file=path.name, sha256="", opset=opts.opset, precision="fp32", inputs=inputs, outputs=outputs,
        dims={"batch": dim(1, min(4, opts.max_batch), opts.max_batch), "text_len": dim(3, 64, cfg.text_positions),
              "prefix_len": dim(cond_rows(cfg) + 4, 128, prefix_max)},
        parity=None, external_data=ext, extra=_kv_extra(uv),
    )
    return _finish(model, out_dir, comp, opts, verifier or verify_prefill)


def export_decode(model: LoadedModel, out_dir: Path, opts: ExportOptions) -> Component:
    uv = model.gpt
    cfg = uv.cfg
    path = out_dir / f"{DECODE}.onnx"
    past, presents = kv_names(cfg.layers, "past_key_values"), kv_names(cfg.layers, "present")
    gen = torch.Generator().manual_seed(opts.seed)
    b, p, t = 2, 9, 1
    hd = cfg.model_dim // cfg.heads
    example = (
        torch.randint(0, cfg.number_mel_codes, (b, t), generator=gen), torch.full((b, t), 2),
        torch.ones(b, p + t, dtype=torch.int64),
        *[torch.randn(b, cfg.heads, p, hd, generator=gen) for _ in past],
    )
    t0 = time.perf_counter()
    ext = export_onnx(
        DecodeGraph(uv), example, path, ["mel_tokens", "mel_positions", "attention_mask", *past],
        ["logits", "hidden", *presents],
        {"mel_tokens": {0: "batch", 1: "new_len"}, "mel_positions": {0: "batch", 1: "new_len"},
         "attention_mask": {0: "batch", 1: "total_len"}, "logits": {0: "batch"},
         "hidden": {0: "batch", 1: "new_len"}, **{n: {0: "batch", 2: "past_len"} for n in past},
         **{n: {0: "batch", 2: "total_len"} for n in presents}},
        opts.opset,
    )
    log.info("exported %s in %.1f s", path.name, time.perf_counter() - t0)
    inputs, outputs = graph_io(path)
    mp = _max_past(uv)
    comp = Component(
        name=DECODE, file=path.name, sha256="", opset=opts.opset, precision="fp32", inputs=inputs, outputs=outputs,
        dims={"batch": dim(1, min(4, opts.max_batch), opts.max_batch), "new_len": dim(1, 1, cfg.mel_positions),
              "past_len": dim(1, 256, mp), "total_len": dim(2, 257, mp + cfg.mel_positions)},
        parity=None, external_data=ext, extra=_kv_extra(uv),
    )
    return _finish(model, out_dir, comp, opts, verify_decode)


def _finish(model, out_dir: Path, comp: Component, opts: ExportOptions, verifier) -> Component:
    comp = Component(**{**comp.__dict__, "sha256": component_digest(out_dir, comp)})
    if opts.verify:
        comp = Component(**{**comp.__dict__, "parity": verifier(model, out_dir, comp, opts)})
    return comp


@dataclass(frozen=True)
class DecodeCase:
    """One decode-graph parity input: the graph's feeds and the float32 tensors engine_ref gets for them."""

    label: str
    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    past: list[torch.Tensor]  # float32, as the graph sees them (rounded when the graph takes fp16 KV)
    feeds: dict[str, np.ndarray]


def decode_cases(cfg, opts: ExportOptions, kv_dtype: type = np.float32) -> list[DecodeCase]:
    """Random past KV with a padding hole, T = 1 at growing batch/past and one T > 1 replay; fixed seed.

    verify_decode and export/precision.py's decode_parity both judge on these, so every precision sees the same draws.
    """
    names = kv_names(cfg.layers, "past_key_values")
    hd = cfg.model_dim // cfg.heads
    gen = torch.Generator().manual_seed(opts.seed + 2)
    out = []
    for batch, past_len, new_len in ((1, 40, 1), (2, 64, 1), (opts.max_batch, 256, 1), (3, 50, 6)):
        tokens = torch.randint(0, cfg.number_mel_codes, (batch, new_len), generator=gen)
        positions = torch.randint(0, cfg.mel_positions, (batch, new_len), generator=gen)
        mask = torch.ones(batch, past_len + new_len, dtype=torch.bool)
        if batch > 1:
            mask[1, : past_len // 3] = False  # a padded row
        kv = [(torch.randn(batch, cfg.heads, past_len, hd, generator=gen) * 0.5).numpy().astype(kv_dtype)
              for _ in names]
        feeds = {"mel_tokens": tokens.numpy(), "mel_positions": positions.numpy(),
                 "attention_mask": mask.to(torch.int64).numpy(), **dict(zip(names, kv))}
        past = [torch.from_numpy(a.astype(np.float32)) for a in kv]
        out.append(DecodeCase(f"batch={batch} past={past_len} new={new_len}", tokens, positions, mask, past, feeds))
    return out


@torch.inference_mode()
def decode_reference(uv: UnifiedVoice, case: DecodeCase) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """engine_ref's logits (last position), hidden (all new positions) and present KV for one DecodeCase."""
    pairs = [(case.past[2 * i], case.past[2 * i + 1]) for i in range(uv.cfg.layers)]
    ref_h, ref_kv = uv.decode(uv.mel_embeds(case.tokens, case.positions), case.mask, pairs)
    return (uv.mel_logits(ref_h[:, -1]).numpy(), uv.latents(ref_h).numpy(),
            [t.numpy() for kv in ref_kv for t in kv])


def measure_decode(sess, uv: UnifiedVoice, cases: list[DecodeCase], logits: ErrorMeter, hidden: ErrorMeter,
                   present: ErrorMeter) -> None:
    """Runs every case through the graph (an ORT session) and engine_ref; each output's error goes to its meter."""
    for case in cases:
        ours_logits, ours_hidden, *ours_presents = sess.run(None, case.feeds)
        ref_logits, ref_hidden, ref_presents = decode_reference(uv, case)
        logits.add(ours_logits, ref_logits)
        hidden.add(ours_hidden, ref_hidden)
        for ours, ref in zip(ours_presents, ref_presents):
            present.add(ours, ref)


def random_texts(uv: UnifiedVoice, lengths: list[int], gen: torch.Generator, first_row: int = 0) -> list[list[int]]:
    """Cleaned text ids (never start/stop) of the given lengths: the prefill verification's texts (`first_row`:
    how many rows earlier cases held, for texts_for functions that cycle through something per row)."""
    return [[int(x) for x in torch.randint(2, uv.cfg.text_vocab, (n,), generator=gen)] for n in lengths]


@torch.inference_mode()
def verify_prefill(model: LoadedModel, out_dir: Path, comp: Component, opts: ExportOptions,
                   texts_for=random_texts, min_rows: int = 0) -> Parity:
    """Prefill graph vs engine_ref's build_prefix + decode at B = 1, 2 and max_batch (padded rows), on the texts
    `texts_for(uv, lengths, generator, first_row)` makes (a family whose ids carry more than the token passes its
    own), plus cases of up to max_batch rows until `min_rows` rows were verified."""
    from export.runtime import OrtDecoder

    uv = model.gpt
    dec = OrtDecoder(out_dir, prefill=comp, decode=None)
    meter = ErrorMeter()
    gen = torch.Generator().manual_seed(opts.seed + 1)
    cases = []
    rows = 0
    batches = [(1, [5]), (2, [3, 11]), (opts.max_batch, None)]
    while batches:
        batch, lengths = batches.pop(0)
        lengths = lengths or [int(x) for x in torch.randint(1, 40, (batch,), generator=gen)]
        conds = torch.randn(batch, cond_rows(uv.cfg), uv.cfg.model_dim, generator=gen)
        texts = texts_for(uv, lengths, gen, rows)
        rows += batch
        if not batches and rows < min_rows:
            batches.append((min(opts.max_batch, min_rows - rows), None))
        logits, hidden, state = dec.prefill(conds.numpy(), texts)
        with torch.inference_mode():
            embeds, valid = build_prefix(uv, conds, texts)
            ref_h, ref_kv = uv.decode(embeds, valid)
        meter.add(logits, uv.mel_logits(ref_h[:, -1]).numpy())
        meter.add(hidden, uv.latents(ref_h[:, -1]).numpy())
        # KV of valid positions only: the graph pads text in the middle, engine_ref on the left.
        for row, n in enumerate(lengths):
            ours_valid = state.mask[row]
            for (k_ref, v_ref), (k, v) in zip(ref_kv, state.layers):
                ref_valid = valid[row].numpy()
                meter.add(k[row][:, ours_valid], k_ref[row][:, ref_valid].numpy())
                meter.add(v[row][:, ours_valid], v_ref[row][:, ref_valid].numpy())
        cases.append(f"batch={batch} text_lens={lengths}")
    check_tolerance(PREFILL, meter, FP32_TOLERANCE)
    return Parity(meter.max_abs, meter.max_rel, FP32_TOLERANCE, tuple(cases))


@torch.inference_mode()
def verify_decode(model: LoadedModel, out_dir: Path, comp: Component, opts: ExportOptions) -> Parity:
    """Decode graph vs engine_ref on random past KV (with padding holes) for T = 1 and T > 1."""
    from export.common import session

    meter = ErrorMeter()
    cases = decode_cases(model.gpt.cfg, opts)
    measure_decode(session(out_dir / comp.file), model.gpt, cases, meter, meter, meter)
    check_tolerance(DECODE, meter, FP32_TOLERANCE)
    return Parity(meter.max_abs, meter.max_rel, FP32_TOLERANCE, tuple(c.label for c in cases))


@torch.inference_mode()
def greedy_parity(model: LoadedModel, export_dir: Path, prompts: int = 10, max_mel_tokens: int = 60,
                  seed: int = 0, precision: str | None = None, decoder=None) -> dict:
    """Greedy codes through ONNX Runtime vs engine_ref on random prompts: counts exact matches and token agreement.

    decoder: an OrtDecoder already open on export_dir (saves loading the graphs again); else one is opened."""
    from export.runtime import OrtDecoder

    uv = model.gpt
    cfg = uv.cfg
    dec = decoder or OrtDecoder.from_manifest(export_dir, precision=precision)
    gen = torch.Generator().manual_seed(seed)
    params = GenerationParams.greedy(max_mel_tokens=max_mel_tokens)
    exact = agree = total = 0
    for _ in range(prompts):
        conds = torch.randn(1, cond_rows(cfg), cfg.model_dim, generator=gen)
        n = int(torch.randint(3, 30, (1,), generator=gen))
        text = [int(x) for x in torch.randint(2, cfg.text_vocab, (n,), generator=gen)]
        ref = decode_sampling(uv, conds, [text], [params], [0])[0]
        ours = dec.greedy(conds.numpy(), text, params)
        exact += int(ours.codes == ref.codes and ours.stopped == ref.stopped)
        agree += sum(a == b for a, b in zip(ours.codes, ref.codes))
        total += max(len(ours.codes), len(ref.codes))
    return {"prompts": prompts, "exact": exact, "token_agreement": agree / max(total, 1)}
