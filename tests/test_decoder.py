"""The GPT decoder, sampling and beam search: KV cache vs recomputation, batching, latent pass, HF parity."""

from __future__ import annotations

import pytest
import torch

from engine_ref.beam_search import decode_beams
from engine_ref.errors import InputError
from engine_ref.generate import build_prefix, decode_sampling, latent_pass, remove_long_silence
from engine_ref.layout import materialize
from engine_ref.layout.gpt import gpt_layout
from engine_ref.modules.unified_voice import UnifiedVoice
from engine_ref.indextts.presets import PRESETS
from engine_ref.sampling import GenerationParams, RowParams, apply_top_k, apply_top_p, initial_seen, process

CFG = PRESETS["tiny"].config.gpt
TEXTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], [44]]


@pytest.fixture(scope="module")
def model() -> UnifiedVoice:
    m = UnifiedVoice(CFG).eval()
    m.load_state_dict(materialize(gpt_layout(CFG, target_codes=25), 0), strict=True)
    return m


@pytest.fixture(scope="module")
def conds(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    mel = torch.randn(1, 100, 150, generator=g)
    with torch.inference_mode():
        return model.conditioning(mel, torch.tensor([150]))


def _full_recompute_greedy(model, conds, ids, params: GenerationParams) -> list[int]:
    """Independent greedy decoder: no cache, the whole sequence re-run at every step."""
    prefix, valid = build_prefix(model, conds, [ids])
    codes: list[int] = []
    seen = initial_seen(1, CFG.number_mel_codes, CFG.start_mel_token)
    rows = RowParams.stack([params])
    with torch.inference_mode():
        for step in range(params.max_mel_tokens):
            if codes:
                mel = model.mel_embeds(torch.tensor([codes]), torch.arange(2, len(codes) + 2).unsqueeze(0))
                seq = torch.cat([prefix, mel], dim=1)
            else:
                seq = prefix
            hidden, _ = model.decode(seq, torch.ones(1, seq.shape[1], dtype=torch.bool))
            tok = int(process(model.mel_logits(hidden[:, -1]), seen, rows, warp=False).argmax())
            if tok == CFG.stop_mel_token:
                break
            codes.append(tok)
            seen[0, tok] = True
    return codes


def test_kv_cache_equals_full_recomputation(model, conds):
    params = GenerationParams.greedy(max_mel_tokens=60)
    for ids in TEXTS[:3]:
        cached = decode_sampling(model, conds, [ids], [params], [0])[0]
        assert cached.stopped, "the tiny preset's decoder must stop by itself"
        assert len(cached.codes) > 5, "the decoder must not stop at the first steps"
        assert cached.codes == _full_recompute_greedy(model, conds, ids, params)


def test_beam_search_with_one_beam_equals_greedy(model, conds):
    greedy = GenerationParams.greedy(max_mel_tokens=60)
    one_beam = GenerationParams(do_sample=False, num_beams=1, max_mel_tokens=60)
    for ids in TEXTS:
        a = decode_sampling(model, conds, [ids], [greedy], [0])[0]
        b = decode_beams(model, conds, [ids], [one_beam], [0])[0]
        assert a.codes == b.codes and a.stopped == b.stopped


def test_batched_greedy_equals_each_alone(model, conds):
    params = [GenerationParams.greedy(max_mel_tokens=60)] * len(TEXTS)
    batched = decode_sampling(model, conds, TEXTS, params, [0] * len(TEXTS))
    for ids, out in zip(TEXTS, batched):
        alone = decode_sampling(model, conds, [ids], params[:1], [0])[0]
        assert out.codes == alone.codes and out.stopped == alone.stopped


def test_batched_sampling_with_seeds_equals_each_alone(model, conds):
    params = [GenerationParams(num_beams=1, max_mel_tokens=40, top_k=50, top_p=0.9)] * 3
    seeds = [11, 12, 13]
    batched = decode_sampling(model, conds, TEXTS[:3], params, seeds)
    for ids, seed, out in zip(TEXTS[:3], seeds, batched):
        assert out.codes == decode_sampling(model, conds, [ids], params[:1], [seed])[0].codes
    # A different seed gives a different draw (the sampler is not secretly greedy).
    other = decode_sampling(model, conds, TEXTS[:1], params[:1], [99])[0]
    assert other.codes != batched[0].codes


def test_batched_beams_equal_each_alone(model, conds):
    params = [GenerationParams(do_sample=False, num_beams=3, max_mel_tokens=40)] * 3
    batched = decode_beams(model, conds, TEXTS[:3], params, [0, 0, 0])
    for ids, out in zip(TEXTS[:3], batched):
        assert out.codes == decode_beams(model, conds, [ids], params[:1], [0])[0].codes


def test_beam_sampling_is_reproducible_per_seed(model, conds):
    p = GenerationParams(max_mel_tokens=40)  # upstream default: 3-beam sampling
    a = decode_beams(model, conds, TEXTS[:1], [p], [5])[0]
    b = decode_beams(model, conds, TEXTS[:1], [p], [5])[0]
    assert a.codes == b.codes and len(a.codes) > 0


def test_latent_pass_equals_autoregressive_hidden_states(model, conds):
    ids = TEXTS[0]
    out = decode_sampling(model, conds, [ids], [GenerationParams.greedy(max_mel_tokens=60)], [0], keep_hidden=True)[0]
    n = len(out.codes)
    ar = model.latents(torch.stack(out.hidden[:n]))  # hidden state fed with start, c1, ..., c_{n-1}
    # Autoregressive positions: start at 0, k-th generated code at k + 1 (position 1 is never used).
    positions = [0] + list(range(2, n + 2)) + [n + 2]
    lat = latent_pass(model, conds, [ids], [out.codes], mel_positions=[positions])[0]
    assert lat.shape == (n, CFG.model_dim)
    torch.testing.assert_close(lat, ar, rtol=1e-4, atol=1e-5)
    # With upstream's own positions (0..n+1) only the first latent (the start position) agrees.
    plain = latent_pass(model, conds, [ids], [out.codes])[0]
    torch.testing.assert_close(plain[0], ar[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain[1:], ar[1:], atol=1e-3)


def test_batched_latent_pass_equals_alone(model, conds):
    codes = [[100, 200, 300], [7, 8, 9, 10, 11, 12], [4000]]
    batched = latent_pass(model, conds, TEXTS[:3], codes)
    for ids, c, lat in zip(TEXTS[:3], codes, batched):
        torch.testing.assert_close(lat, latent_pass(model, conds, [ids], [c])[0], rtol=1e-4, atol=1e-5)


def test_max_mel_tokens_cuts_and_reports(model, conds):
    out = decode_sampling(model, conds, TEXTS[:1], [GenerationParams.greedy(max_mel_tokens=7)], [0])[0]
    assert len(out.codes) == 7 and not out.stopped
    beam = decode_beams(model, conds, TEXTS[:1], [GenerationParams(do_sample=False, max_mel_tokens=7)], [0])[0]
    assert len(beam.codes) == 7 and not beam.stopped


def test_remove_long_silence_matches_upstream_rule():
    few = [52] * 30 + [1, 2]
    assert remove_long_silence(few) == few  # 30 silent codes in total: untouched
    many = [3] + [52] * 20 + [4] + [52] * 5 + [5] + [52] * 12
    assert remove_long_silence(many) == [3] + [52] * 10 + [4] + [52] * 5 + [5] + [52] * 10


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0),
     ("num_beams", 0), ("num_beams", 99), ("max_mel_tokens", 0), ("max_mel_tokens", 10_000)],
)
def test_out_of_range_parameters_are_named(field, value):
    with pytest.raises(InputError, match=field):
        GenerationParams(**{field: value}).validate(CFG)


# --- parity with Hugging Face, which the original pipeline runs on ----------------------------------------------

# transformers is a dev dependency only (the engine never imports it): the reference it gives is the point.
import transformers  # noqa: E402


def test_gpt2_stack_equals_hf_gpt2model(model):
    hf_cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=512, n_embd=CFG.model_dim, n_layer=CFG.layers, n_head=CFG.heads,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )
    hf = transformers.GPT2Model(hf_cfg).eval()
    state = {k[len("gpt."):]: v for k, v in model.state_dict().items() if k.startswith("gpt.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"wte.weight", "wpe.weight"}, missing
    with torch.no_grad():
        hf.wpe.weight.zero_()  # upstream replaces wpe by zeros
        x = torch.randn(2, 9, CFG.model_dim, generator=torch.Generator().manual_seed(0))
        ours, _ = model.decode(x, torch.ones(2, 9, dtype=torch.bool))
        theirs = hf(inputs_embeds=x).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_processors_equal_hf():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 200, generator=g) * 3
    input_ids = torch.tensor([[1, 1, 1, 150, 7, 9], [1, 1, 1, 150, 7, 7], [1, 1, 1, 150, 3, 100]])
    seen = torch.zeros(3, 200, dtype=torch.bool)
    seen.scatter_(1, input_ids, True)
    p = GenerationParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=10.0)
    ours = process(scores.clone(), seen, RowParams.stack([p] * 3), warp=True)
    theirs = RepetitionPenaltyLogitsProcessor(10.0)(input_ids, scores.clone())
    theirs = TemperatureLogitsWarper(0.7)(input_ids, theirs)
    theirs = TopKLogitsWarper(20)(input_ids, theirs)
    theirs = TopPLogitsWarper(0.8)(input_ids, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])
    # min_tokens_to_keep = 2, as beam search uses it
    k2 = apply_top_k(scores.clone(), torch.tensor([1, 1, 1]), 2)
    assert int((~torch.isinf(k2)).sum(dim=1).min()) == 2
    pp = apply_top_p(scores.clone(), torch.tensor([0.01, 0.01, 1.0]), 2)
    assert (~torch.isinf(pp)).sum(dim=1).tolist()[:2] == [2, 2] and not torch.isinf(pp[2]).any()
