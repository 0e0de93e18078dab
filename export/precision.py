"""Precision variants of the decoder graphs: weight-only int8/int4 (CPU), fp16 (GPU) and an ORT-fused fp32.

Why each variant exists and what it is made of (numbers: v1.5 sizes with random weights, 2-core AMD EPYC VM,
ONNX Runtime 1.31, 2 intra-op threads, decode step at past 64; see perf/export_bench.py for the full table):

- int4 / int8 (`gpt_decode@int4|int8`): one decode step streams every decoder weight once, so at batch 1 it is
  memory-bound; MatMulNBits stores weights as 4/8-bit blocks (block 32, symmetric, no zero points; accuracy_level
  4). The mel_head, an `nn.Linear` exported as Gemm (which the quantizer skips), is rewritten as MatMul + Add first
  so it is quantized too: it is 42 MB of the 1.98 GB fp32 decoder, ~8 % of an int4 step's bytes; quantizing it
  measured ~1-2 ms/step faster at batch 1 (18.0 -> 17.6 ms best-of-30, 18.4 -> 16.6 ms median) with the same
  argmax agreement on v1.5 (59.2 % vs 56.4 % with an fp32 head; the 24 blocks' error dominates).
  Measured at batch 1: fp32 ~68 ms, int8 ~28 ms, int4 ~17-20 ms per step; logits max_rel vs engine_ref on the
  verification cases: int8 0.8 %, int4 8.6 %.
  The prefill graph stays fp32: it runs once per segment and is compute-bound (92 positions: ~155 GFLOP/s), and an
  int4 prefill measured no faster (b1: 572 vs 562 ms; b4: 2196 vs 2080 ms best-of-8) while its logits moved 18 %
  and every cached key/value would carry the error. OrtDecoder pairs the fp32 prefill with the n-bit decode graph.
- fp16 (`gpt_prefill@fp16` + `gpt_decode@fp16`): for GPUs. Weights, conds and the KV cache (past/present) are
  float16, which halves cache memory and per-step cache traffic; `logits` and `hidden` stay float32 so sampling and
  the vocoder see the dtype they see with fp32. Both graphs are converted because they exchange the cache, and
  OrtDecoder picks the cache dtype from the `conds` input. CPU ONNX Runtime runs them (v1.5: logits max_rel
  2.5e-4 decode / 5.1e-4 prefill, 99.6 % agreement, 84 ms/step vs 89 ms fp32), so parity is verified on CPU;
  GPU execution and speed are not measured by this export (Parity.extra says so).
- fp32opt (`gpt_decode@fp32opt`): onnxruntime.transformers.optimizer (model_type gpt2) fuses SkipLayerNorm and
  FastGelu (the attention pattern with our explicit KV layout is not fused). Parity holds (fp32 math, 2e-7) but
  it measured no faster than ORT's own online optimizations (best-of-25: b1 70.6 vs 70.8 ms, b8/p256 160.8 vs
  157.6 ms): the step is weight-bandwidth-bound. The pipeline does not request it; make_variants still builds it
  on demand (for measurements, or for providers whose own fusions are weaker).

Every variant records its Parity against engine_ref on export/gpt.py's decode verification cases (max error of
the logits), and in Parity.extra: greedy argmax agreement with the fp32 graphs over 10 prompts x 50
teacher-forced steps, and the measured step time at batch 1 (informational). Quantized variants fail the export
when that agreement falls below `min_token_agreement` (see WeightOnlyConfig), fp16 when logits exceed 1e-2.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from engine_ref.errors import InputError
from engine_ref.indextts.loader import LoadedModel
from export.common import (
    EXTERNAL_DATA_THRESHOLD,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ErrorMeter,
    ExportOptions,
    ParityError,
    check_tolerance,
    graph_io,
    session,
)
from export.gpt import DECODE, PREFILL, cond_rows, decode_cases, kv_names, measure_decode
from export.manifest import Component, Parity, component_digest

log = logging.getLogger("export.precision")

VARIANT_PRECISIONS = ("fp16", "int8", "int4", "fp32opt")


TARGET_TOKEN_AGREEMENT = 0.99  # the quality target: recorded (and warned about), see WeightOnlyConfig


@dataclass(frozen=True)
class WeightOnlyConfig:
    """MatMulNBits weight-only quantization of the decode graph, and the gates its export must pass.

    `min_token_agreement` is a hard gate: below it the export fails. It is set to catch a broken graph (whose
    argmax agrees with fp32 at chance level, ~0 %), not to certify quality, because on the random-weight presets
    agreement measures the model more than the quantizer: their next-code logits are near-flat (top-1/top-2 gaps
    of ~0.2 logits), so honest weight noise flips many steps. Measured (10 x 50 teacher-forced steps):
    v1.5 preset int8 94.2 %, int4 59.2 % (asymmetric 50.8 %, block 16 55.6 %, fp32 mel_head 56.4 %: the 24 blocks'
    error dominates); tiny preset int8 97.8 %, int4 88.8 %. The gates (int8 80 %, int4 40 %) sit well below those
    and far above chance. Whether a variant reaches TARGET_TOKEN_AGREEMENT (99 %) is recorded in Parity.extra and
    logged as a warning when it does not; on a trained checkpoint that verdict is the one to read.
    `max_logit_rel`: sanity bound on the logits' relative error on the verification cases, well above honest
    quantization noise (v1.5: int8 0.8 %, int4 8.6 % on these cases, up to 2.7 % / 27 % on the benchmark's random
    inputs) and below a graph that computes something else (uncorrelated logits: ~100 % and more).
    """

    bits: int
    min_token_agreement: float
    max_logit_rel: float
    block_size: int = 32
    symmetric: bool = True
    # 4 = int8 activations x n-bit weights where MLAS has such kernels (AVX512-VNNI/AVX-VNNI/ARM); on this AVX2-only
    # test CPU levels 4 and 1 gave bit-identical outputs (fp32 compute was chosen).
    accuracy_level: int = 4
    quantize_mel_head: bool = True


WEIGHT_ONLY = {
    "int8": WeightOnlyConfig(bits=8, min_token_agreement=0.80, max_logit_rel=0.10),
    "int4": WeightOnlyConfig(bits=4, min_token_agreement=0.40, max_logit_rel=0.50),
}


@dataclass(frozen=True)
class AgreementConfig:
    prompts: int = 10
    steps: int = 50


@dataclass(frozen=True)
class Agreement:
    """Teacher-forced argmax agreement of a variant with the fp32 graphs."""

    agreement: float
    compared: int
    mismatches: int
    max_fp32_margin_at_mismatch: float  # how strongly fp32 preferred its token where they disagreed (logit units)

    def as_dict(self) -> dict:
        return {"token_agreement": self.agreement, "compared": self.compared, "mismatches": self.mismatches,
                "max_fp32_margin_at_mismatch": self.max_fp32_margin_at_mismatch}


def variant_file(name: str, precision: str) -> str:
    return f"{name}.{precision}.onnx"


# --------------------------------------------------------------------------------------------------- graph rewriting


def save_graph(model: onnx.ModelProto, path: Path) -> tuple[str, ...]:
    """Save in one file when the weights fit protobuf's limit, else all weights in one `<name>.data` beside it."""
    data_name = path.name + ".data"
    for stale in (path, path.with_name(data_name)):
        stale.unlink(missing_ok=True)
    weight_bytes = sum(t.ByteSize() for t in model.graph.initializer)
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return ()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)
    return (data_name,)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite Gemm nodes with a constant weight (nn.Linear) as MatMul + Add so MatMulNBits can quantize them.

    Returns the number of rewritten nodes. Only alpha = beta = 1 and transA = 0 (what nn.Linear exports) qualify.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        w = np.ascontiguousarray(w.T if attrs.get("transB", 0) else w)
        weight = numpy_helper.from_array(w, node.input[1] + "_kn")
        graph.initializer.append(weight)
        product = node.output[0] + "_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], weight.name], [product], name=node.name + "_matmul"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        else:
            nodes.append(helper.make_node("Identity", [product], [node.output[0]], name=node.name + "_out"))
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)
    return rewritten


@contextlib.contextmanager
def _quiet_root_logging() -> Iterator[None]:
    """onnxruntime.quantization calls logging.basicConfig(INFO) on import; keep the host's logging as it was."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)


def quantize_weight_only(src: Path, dst: Path, cfg: WeightOnlyConfig) -> tuple[str, ...]:
    """MatMulNBits weight-only quantization of every MatMul with a constant weight; returns external data names."""
    with _quiet_root_logging():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src), load_external_data=True)
    if cfg.quantize_mel_head:
        gemm_to_matmul(model)
    quantizer = MatMulNBitsQuantizer(
        model, bits=cfg.bits, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
        accuracy_level=cfg.accuracy_level, op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return save_graph(quantizer.model.model, dst)


def convert_fp16(src: Path, dst: Path, keep_float32: tuple[str, ...] = ("logits", "hidden")) -> tuple[str, ...]:
    """float16 weights, activations, conds and KV cache; `keep_float32` outputs are cast back inside the graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # A path (not a ModelProto) lets the converter run shape inference on graphs over 2 GB.
    model = convert_float_to_float16(str(src), keep_io_types=list(keep_float32))
    return save_graph(model, dst)


def optimize_fp32(src: Path, dst: Path, heads: int, dim: int) -> tuple[str, ...]:
    """ORT transformer fusions (SkipLayerNorm, FastGelu) ahead of time; the math stays fp32."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), model_type="gpt2", num_heads=heads, hidden_size=dim, opt_level=0, use_gpu=False)
    return save_graph(opt.model, dst)


# --------------------------------------------------------------------------------------------------------- measuring


def _np_dtype(comp: Component, name: str) -> type:
    return np.float16 if comp.input(name).dtype == "float16" else np.float32


def decode_parity(model: LoadedModel, export_dir: Path, comp: Component, opts: ExportOptions,
                  tolerance: float) -> Parity:
    """Logits/hidden/present of a decode graph vs engine_ref on export/gpt.py's decode_cases (verify_decode's draws).

    Parity.max_abs / max_rel are the logits' (what sampling sees); hidden and present errors go to extra.
    """
    kv_dtype = _np_dtype(comp, kv_names(model.gpt.cfg.layers, "past_key_values")[0])
    logits_m, hidden_m, kv_m = ErrorMeter(), ErrorMeter(), ErrorMeter()
    cases = decode_cases(model.gpt.cfg, opts, kv_dtype)
    measure_decode(session(export_dir / comp.file), model.gpt, cases, logits_m, hidden_m, kv_m)
    return Parity(logits_m.max_abs, logits_m.max_rel, tolerance, tuple(c.label for c in cases),
                  extra={"hidden_max_rel": hidden_m.max_rel, "present_max_rel": kv_m.max_rel})


@torch.inference_mode()
def prefill_parity(model: LoadedModel, export_dir: Path, comp: Component, opts: ExportOptions,
                   tolerance: float) -> Parity:
    """Logits and start-position hidden of a prefill graph vs engine_ref (verify_prefill's batch shapes)."""
    from engine_ref.generate import build_prefix
    from export.runtime import OrtDecoder

    uv = model.gpt
    dec = OrtDecoder(export_dir, prefill=comp, decode=None)
    logits_m, hidden_m = ErrorMeter(), ErrorMeter()
    gen = torch.Generator().manual_seed(opts.seed + 1)
    cases = []
    for batch, lengths in ((1, [5]), (2, [3, 11]), (opts.max_batch, None)):
        lengths = lengths or [int(x) for x in torch.randint(1, 40, (batch,), generator=gen)]
        conds = torch.randn(batch, cond_rows(uv.cfg), uv.cfg.model_dim, generator=gen)
        texts = [[int(x) for x in torch.randint(2, uv.cfg.text_vocab, (n,), generator=gen)] for n in lengths]
        if dec.dtype == np.float16:
            conds = conds.half().float()  # the reference sees the conds the graph sees
        logits, hidden, _ = dec.prefill(conds.numpy(), texts)
        embeds, valid = build_prefix(uv, conds, texts)
        ref_h, _ = uv.decode(embeds, valid)
        logits_m.add(logits, uv.mel_logits(ref_h[:, -1]).numpy())
        hidden_m.add(hidden, uv.latents(ref_h[:, -1]).numpy())
        cases.append(f"batch={batch} text_lens={lengths}")
    return Parity(logits_m.max_abs, logits_m.max_rel, tolerance, tuple(cases),
                  extra={"hidden_max_rel": hidden_m.max_rel})


def token_agreement(reference, variant, model: LoadedModel, cfg: AgreementConfig = AgreementConfig(),
                    seed: int = 0, chunk: int = 8) -> Agreement:
    """Teacher-forced greedy agreement: both decoders are fed the fp32 argmax token at every step.

    `reference`/`variant` are export.runtime.OrtDecoder instances. Prompts are random conds and text (as in
    export/gpt.py greedy_parity); each decode step's argmax is compared (the prefill's is not: with a shared fp32
    prefill it would agree trivially). Rows of a chunk run as one padded batch.
    """
    gcfg = model.gpt.cfg
    rng = np.random.default_rng(seed)
    agree = compared = 0
    worst = 0.0
    for start in range(0, cfg.prompts, chunk):
        b = min(chunk, cfg.prompts - start)
        conds = rng.standard_normal((b, cond_rows(gcfg), gcfg.model_dim)).astype(np.float32)
        texts = [[int(x) for x in rng.integers(2, gcfg.text_vocab, int(rng.integers(3, 30)))] for _ in range(b)]
        ref_logits, _, ref_state = reference.prefill(conds, texts)
        _, _, var_state = variant.prefill(conds, texts)
        tokens = np.argmax(ref_logits, axis=-1)
        for step in range(1, cfg.steps + 1):
            pos = np.full((b, 1), step + reference.first_position - 1, np.int64)
            ref_logits, _, ref_state = reference.decode(tokens[:, None], pos, ref_state)
            var_logits, _, var_state = variant.decode(tokens[:, None], pos, var_state)
            ref_logits = ref_logits.astype(np.float32)
            ours = np.argmax(var_logits, axis=-1)
            tokens = np.argmax(ref_logits, axis=-1)
            same = ours == tokens
            agree += int(same.sum())
            compared += b
            for r in np.flatnonzero(~same):
                worst = max(worst, float(ref_logits[r, tokens[r]] - ref_logits[r, ours[r]]))
    return Agreement(agree / max(compared, 1), compared, compared - agree, worst)


def step_time_ms(decoder, batch: int = 1, past: int = 128, reps: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """Median wall time of one decode step (T = 1) of an OrtDecoder at a given batch and past length."""
    from export.runtime import KVState

    rng = np.random.default_rng(seed)
    shape = (batch, decoder.heads, past, decoder.head_dim)
    layers = [((rng.standard_normal(shape) * 0.5).astype(decoder.dtype),
               (rng.standard_normal(shape) * 0.5).astype(decoder.dtype)) for _ in range(decoder.layers)]
    state = KVState(layers, np.ones((batch, past), bool))
    tok = np.full((batch, 1), 7, np.int64)
    pos = np.full((batch, 1), 3, np.int64)
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        decoder.decode(tok, pos, state)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


# ------------------------------------------------------------------------------------------------------- the variants


def _variant_component(export_dir: Path, base: Component, precision: str, ext: tuple[str, ...],
                       extra: dict) -> Component:
    path = export_dir / variant_file(base.name, precision)
    inputs, outputs = graph_io(path)
    comp = Component(
        name=base.name, file=path.name, sha256="", opset=base.opset, precision=precision, inputs=inputs,
        outputs=outputs, dims=dict(base.dims), parity=None, external_data=ext, extra={**base.extra, **extra},
    )
    return replace(comp, sha256=component_digest(export_dir, comp))


def _measure(model: LoadedModel, export_dir: Path, base: dict[str, Component], prefill: Component,
             decode: Component, parity: Parity, opts: ExportOptions) -> tuple[Parity, Agreement]:
    """Adds token agreement and step times (variant and fp32 at batch 1) to a decode parity."""
    from export.runtime import OrtDecoder

    reference = OrtDecoder(export_dir, base[PREFILL], base[DECODE])
    variant = OrtDecoder(export_dir, prefill, decode)
    acfg = AgreementConfig()
    agreement = token_agreement(reference, variant, model, acfg, seed=opts.seed, chunk=max(1, opts.max_batch))
    extra = {
        **parity.extra, **agreement.as_dict(),
        "agreement_protocol": f"{acfg.prompts} prompts x {acfg.steps} teacher-forced steps vs the fp32 graphs",
        "step_ms_b1": round(step_time_ms(variant), 2), "fp32_step_ms_b1": round(step_time_ms(reference), 2),
        "step_ms_note": "informational: batch 1, past 128, median of 5 on the export machine",
    }
    return replace(parity, extra=extra), agreement


def _require_gpt(base: dict[str, Component], precision: str) -> None:
    if PREFILL not in base or DECODE not in base:
        raise InputError(
            f"precision '{precision}' makes variants of the decoder graphs, but this export has no gpt component",
            "add gpt to --components (e.g. --components gpt) or drop the non-fp32 --precision",
        )


def make_variants(model: LoadedModel, out_dir: Path, base: dict[str, Component], precision: str,
                  opts: ExportOptions) -> dict[str, Component]:
    """Variants of the decoder graphs at `precision`, keyed `<name>@<precision>`, each verified and measured."""
    if precision not in VARIANT_PRECISIONS:
        raise InputError(f"unknown variant precision '{precision}'", f"choose from {', '.join(VARIANT_PRECISIONS)}")
    _require_gpt(base, precision)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if precision in WEIGHT_ONLY:
        out = _weight_only_variant(model, out_dir, base, precision, opts)
    elif precision == "fp16":
        out = _fp16_variant(model, out_dir, base, opts)
    else:
        out = _fp32opt_variant(model, out_dir, base, opts)
    log.info("precision %s done in %.1f s", precision, time.perf_counter() - t0)
    return out


def _weight_only_variant(model, out_dir: Path, base: dict[str, Component], precision: str,
                         opts: ExportOptions) -> dict[str, Component]:
    cfg = WEIGHT_ONLY[precision]
    src = base[DECODE]
    ext = quantize_weight_only(out_dir / src.file, out_dir / variant_file(DECODE, precision), cfg)
    facts = {"weights": f"int{cfg.bits} MatMulNBits block {cfg.block_size} "
                        f"{'symmetric' if cfg.symmetric else 'asymmetric'} accuracy_level {cfg.accuracy_level}",
             "mel_head_quantized": cfg.quantize_mel_head, "kv_dtype": "float32"}
    comp = _variant_component(out_dir, src, precision, ext, facts)
    if not opts.verify:
        return {f"{DECODE}@{precision}": comp}
    parity = decode_parity(model, out_dir, comp, opts, cfg.max_logit_rel)
    check_tolerance(f"{DECODE}@{precision}", ErrorMeter(parity.max_abs, parity.max_rel), cfg.max_logit_rel)
    parity, agreement = _measure(model, out_dir, base, base[PREFILL], comp, parity, opts)
    meets = agreement.agreement >= TARGET_TOKEN_AGREEMENT
    parity = replace(parity, extra={**parity.extra, "min_token_agreement": cfg.min_token_agreement,
                                    "target_token_agreement": TARGET_TOKEN_AGREEMENT, "meets_target": meets})
    if agreement.agreement < cfg.min_token_agreement:
        raise ParityError(
            f"{DECODE}@{precision}: greedy token agreement with fp32 is {agreement.agreement:.1%} "
            f"({agreement.mismatches}/{agreement.compared} steps differ) < required {cfg.min_token_agreement:.0%}; "
            f"the quantized decoder is not exported"
        )
    log.info("%s@%s: logits max_rel %.3g, token agreement %.1f%%, step %.1f ms (fp32 %.1f ms)", DECODE, precision,
             parity.max_rel, 100 * agreement.agreement, parity.extra["step_ms_b1"], parity.extra["fp32_step_ms_b1"])
    if not meets:
        log.warning("%s@%s: token agreement %.1f%% is below the %.0f%% target (expected on random-weight presets; "
                    "on a trained checkpoint, prefer a wider precision)", DECODE, precision, 100 * agreement.agreement,
                    100 * TARGET_TOKEN_AGREEMENT)
    return {f"{DECODE}@{precision}": replace(comp, parity=parity)}


def _fp16_variant(model, out_dir: Path, base: dict[str, Component], opts: ExportOptions) -> dict[str, Component]:
    facts = {"kv_dtype": "float16", "weights": "float16", "float32_outputs": ["logits", "hidden"]}
    comps = {}
    for name in (PREFILL, DECODE):
        ext = convert_fp16(out_dir / base[name].file, out_dir / variant_file(name, "fp16"))
        comps[name] = _variant_component(out_dir, base[name], "fp16", ext, facts)
    if opts.verify:
        pre = prefill_parity(model, out_dir, comps[PREFILL], opts, FP16_TOLERANCE)
        check_tolerance(f"{PREFILL}@fp16", ErrorMeter(pre.max_abs, pre.max_rel), FP16_TOLERANCE)
        dec = decode_parity(model, out_dir, comps[DECODE], opts, FP16_TOLERANCE)
        check_tolerance(f"{DECODE}@fp16", ErrorMeter(dec.max_abs, dec.max_rel), FP16_TOLERANCE)
        dec, agreement = _measure(model, out_dir, base, comps[PREFILL], comps[DECODE], dec, opts)
        note = {"verified_on": "CPUExecutionProvider (GPU execution not verified by this export)"}
        comps[PREFILL] = replace(comps[PREFILL], parity=replace(pre, extra={**pre.extra, **note}))
        comps[DECODE] = replace(comps[DECODE], parity=replace(dec, extra={**dec.extra, **note}))
        log.info("fp16: logits max_rel prefill %.3g decode %.3g, token agreement %.1f%%", pre.max_rel, dec.max_rel,
                 100 * agreement.agreement)
    return {f"{name}@fp16": comp for name, comp in comps.items()}


def _fp32opt_variant(model, out_dir: Path, base: dict[str, Component], opts: ExportOptions) -> dict[str, Component]:
    cfg = model.gpt.cfg
    src = base[DECODE]
    ext = optimize_fp32(out_dir / src.file, out_dir / variant_file(DECODE, "fp32opt"), cfg.heads, cfg.model_dim)
    comp = _variant_component(out_dir, src, "fp32opt", ext, {"fusions": "SkipLayerNorm, FastGelu (ORT gpt2 optimizer)"})
    if not opts.verify:
        return {f"{DECODE}@fp32opt": comp}
    parity = decode_parity(model, out_dir, comp, opts, FP32_TOLERANCE)
    check_tolerance(f"{DECODE}@fp32opt", ErrorMeter(parity.max_abs, parity.max_rel), FP32_TOLERANCE)
    parity, _ = _measure(model, out_dir, base, base[PREFILL], comp, parity, opts)
    return {f"{DECODE}@fp32opt": replace(comp, parity=parity)}
