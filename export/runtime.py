"""A thin ONNX Runtime layer over the exported graphs, shared by export verification and the Triton models.

`KVState` holds the cache of a batch of sequences as numpy arrays plus a validity mask; rows can be selected,
joined (padding the shorter past with masked columns) and compacted, which is what continuous batching needs.
`OrtDecoder` runs prefill/decode/latents with names and shapes taken from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine_ref.generate import DecodeOutput
from engine_ref.sampling import GenerationParams, RowParams, initial_seen, make_generator, select_next
from export.common import session
from export.manifest import Component, Manifest, read_manifest


@dataclass
class KVState:
    """Per-layer (key, value) arrays [B, H, S, hd] and the [B, S] mask of valid positions."""

    layers: list[tuple[np.ndarray, np.ndarray]]
    mask: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def flat(self) -> list[np.ndarray]:
        return [t for kv in self.layers for t in kv]

    def select(self, rows: Sequence[int]) -> "KVState":
        idx = np.asarray(rows, dtype=np.int64)
        return KVState([(k[idx], v[idx]) for k, v in self.layers], self.mask[idx]).compact()

    def compact(self) -> "KVState":
        """Drop leading columns no row uses (left after long sequences leave the batch)."""
        used = self.mask.any(axis=0)
        first = int(np.argmax(used)) if used.any() else self.length
        if first == 0:
            return self
        return KVState([(k[:, :, first:], v[:, :, first:]) for k, v in self.layers], self.mask[:, first:])

    @staticmethod
    def join(states: Sequence["KVState"]) -> "KVState":
        """Stack batches with different past lengths; shorter ones are padded on the left with masked zeros."""
        width = max(s.length for s in states)

        def pad(a: np.ndarray, n: int) -> np.ndarray:
            if n == 0:
                return a
            shape = list(a.shape)
            shape[2] = n
            return np.concatenate([np.zeros(shape, a.dtype), a], axis=2)

        layers = []
        for i in range(len(states[0].layers)):
            ks = [pad(s.layers[i][0], width - s.length) for s in states]
            vs = [pad(s.layers[i][1], width - s.length) for s in states]
            layers.append((np.concatenate(ks), np.concatenate(vs)))
        mask = np.concatenate([np.pad(s.mask, ((0, 0), (width - s.length, 0))) for s in states])
        return KVState(layers, mask)


class OrtDecoder:
    """Prefill / decode / latent pass through ONNX Runtime sessions of the exported decoder graphs."""

    def __init__(self, export_dir: str | Path, prefill: Component, decode: Component | None,
                 threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                 spinning: bool = True):
        export_dir = Path(export_dir)
        self.prefill_comp, self.decode_comp = prefill, decode
        extra = prefill.extra
        self.layers: int = extra["layers"]
        self.heads: int = extra["heads"]
        self.head_dim: int = extra["head_dim"]
        # Conditioning rows ahead of the text (1.x: 32 latents; IndexTTS2: 32 latents + 2 speed rows = 34).
        self.cond_rows: int = int(extra.get("cond_rows", extra["num_latents"]))
        self.num_latents: int = self.cond_rows  # the older name, kept for callers
        self.start_text, self.stop_text = extra["start_text_token"], extra["stop_text_token"]
        self.start_mel, self.stop_mel = extra["start_mel_token"], extra["stop_mel_token"]
        self.vocab: int = extra["vocab"]
        self.first_position: int = extra["first_generated_position"]
        self._prefill = session(export_dir / prefill.file, threads, providers, spinning=spinning)
        self._decode = session(export_dir / decode.file, threads, providers, spinning=spinning) if decode else None
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.dtype = np.float16 if prefill.input("conds").dtype == "float16" else np.float32

    @classmethod
    def from_manifest(cls, export_dir: str | Path, manifest: Manifest | None = None, precision: str | None = None,
                      **kwargs) -> "OrtDecoder":
        manifest = manifest or read_manifest(export_dir)
        return cls(export_dir, manifest.component("gpt_prefill", precision if precision == "fp16" else None),
                   manifest.component("gpt_decode", precision), **kwargs)

    def prefill(self, conds: np.ndarray, texts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, KVState]:
        """conds [B, cond_rows, D]; texts: cleaned text ids per row (start/stop are added here)."""
        b = len(texts)
        wrapped = [[self.start_text, *t, self.stop_text] for t in texts]
        width = max(len(w) for w in wrapped)
        ids = np.zeros((b, width), np.int64)
        pos = np.zeros((b, width), np.int64)
        text_mask = np.zeros((b, width), bool)
        for r, w in enumerate(wrapped):
            ids[r, width - len(w):] = w
            pos[r, width - len(w):] = np.arange(len(w))
            text_mask[r, width - len(w):] = True
        mask = np.concatenate([np.ones((b, self.cond_rows), bool), text_mask, np.ones((b, 1), bool)], axis=1)
        if conds.shape[0] == 1 and b > 1:
            conds = np.repeat(conds, b, axis=0)
        logits, hidden, *kv = self._prefill.run(None, {
            "conds": conds.astype(self.dtype), "text_ids": ids, "text_positions": pos,
            "attention_mask": mask.astype(np.int64),
        })
        return logits, hidden, KVState([(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)], mask)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, state: KVState,
               new_valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, KVState]:
        """tokens/positions [B, T]; new_valid [B, T] marks real new tokens (default all)."""
        if self._decode is None:
            raise RuntimeError("this OrtDecoder was built without the decode graph")
        new_valid = np.ones(tokens.shape, bool) if new_valid is None else new_valid
        mask = np.concatenate([state.mask, new_valid], axis=1)
        feeds = {"mel_tokens": tokens.astype(np.int64), "mel_positions": positions.astype(np.int64),
                 "attention_mask": mask.astype(np.int64), **dict(zip(self.past_names, state.flat()))}
        logits, hidden, *kv = self._decode.run(None, feeds)
        return logits, hidden, KVState([(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)], mask)

    def latents(self, conds: np.ndarray, texts_raw: Sequence[Sequence[int]],
                codes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced latents [n_i, D] (upstream's second pass): prefill, then the codes replayed."""
        _, start_hidden, state = self.prefill(conds, texts_raw)
        return self.latents_after_prefix(state, start_hidden, codes)

    def latents_after_prefix(self, prefix: KVState, start_hidden: np.ndarray,
                             codes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Latents from a saved prefix KV ([conds | text | start]) and its start-position hidden state [B, D].

        The start position's latent is the prefill's; codes 1..n-1 are replayed at positions 1..n-1 through the
        decode graph (right-padded and masked when lengths differ); the last code has no latent of its own.
        """
        longest = max(len(c) for c in codes)
        rest = None
        if longest > 1:
            t = longest - 1
            tok = np.zeros((len(codes), t), np.int64)
            pos = np.zeros((len(codes), t), np.int64)
            valid = np.zeros((len(codes), t), bool)
            for r, c in enumerate(codes):
                k = len(c) - 1
                tok[r, :k] = c[:k]
                pos[r, :k] = np.arange(1, k + 1)
                valid[r, :k] = True
            _, rest, _ = self.decode(tok, pos, prefix, valid)
        result = []
        for r, c in enumerate(codes):
            parts = [start_hidden[r : r + 1]]
            if len(c) > 1:
                parts.append(rest[r, : len(c) - 1])
            result.append(np.concatenate(parts, axis=0)[: len(c)])
        return result

    def greedy(self, conds: np.ndarray, text: Sequence[int], params: GenerationParams, seed: int = 0) -> DecodeOutput:
        """One sequence, greedy or sampled (num_beams = 1), with engine_ref's token selection."""
        logits, _, state = self.prefill(conds, [text])
        rows = RowParams.stack([params])
        seen = initial_seen(1, self.vocab, self.start_mel)
        gens = [make_generator(seed) if params.do_sample else None]
        out = DecodeOutput(codes=[], stopped=False)
        for step in range(1, params.max_mel_tokens + 1):
            tok = int(select_next(torch.from_numpy(logits).float(), seen, rows, torch.tensor([params.do_sample]),
                                  gens)[0])
            if tok == self.stop_mel:
                out.stopped = True
                break
            out.codes.append(tok)
            seen[0, tok] = True
            if step == params.max_mel_tokens:
                break
            logits, _, state = self.decode(np.array([[tok]]), np.array([[step + self.first_position - 1]]), state)
        return out
