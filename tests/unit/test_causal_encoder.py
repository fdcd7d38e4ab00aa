"""The lean causal forward (models/causal_encoder.py) against transformers' DiffusionGemma encoder:
the same logits and the same greedy tokens, on the committed checkpoint and on a random model
whose every scale is away from 1 and whose sliding window is shorter than the rows."""

from dataclasses import replace

import pytest
import torch

from models.architecture import MICRO, build_config
from models.causal_encoder import DENSE_EXPERT_TOKENS, SlotKV, lean_encoder
from models.loading import left_padded
from models.verifier import ARVerifier, DiffusionCausalLM, row_positions

ATOL = 1e-4


@pytest.fixture(scope="module")
def odd(tiny):
    """A random model: window 8, two sliding layers and a full one, 3 experts (top 2), and
    random router scales, expert scales and layer scalars."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(0)
    spec = replace(MICRO, num_hidden_layers=3, num_experts=3, top_k_experts=2, sliding_window=8)
    model = DiffusionGemmaForBlockDiffusion(build_config(spec)).eval()
    with torch.no_grad():
        for layer in model.model.encoder.language_model.layers:
            layer.router.scale.uniform_(0.5, 1.5)
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
            layer.layer_scalar.fill_(0.9)
    return ARVerifier(DiffusionCausalLM(model, tiny.tokenizer), [1])  # MICRO has the tiny vocabulary


def _hf(v: ARVerifier, prompts):
    ids, mask = left_padded(prompts, v.pad_id, "cpu")
    cache = v.lm.new_cache()
    return v.lm.logits(ids, mask, 0, cache, row_positions(mask))[:, -1], cache, mask


def _prompts(n_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in n_tokens]


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_prefill_and_decode_steps_match_transformers(request, which):
    v = request.getfixturevalue(which)
    enc = lean_encoder(v.lm.model)
    # rows of one length: transformers' sliding window counts columns, which then equal positions
    prompts = _prompts([21, 21, 21] if which == "odd" else [5, 140, 17, 33])
    with torch.inference_mode():
        want, cache, mask = _hf(v, prompts)
        kv = SlotKV(enc, 1, capacity=16)  # too small: it grows
        got = enc.forward(kv, 0, prompts, [0] * len(prompts))
        assert (got - want).abs().max() < ATOL
        seqs = [list(p) for p in prompts]
        for step in range(4):
            extra = [[7 + step]] * len(seqs)  # one token each (uniform), then uneven (jump-forward)
            if step % 2 and which == "tiny":
                extra = [[8, 9], [10], [11, 12, 13], [14]]
            starts = [len(s) for s in seqs]
            seqs = [s + e for s, e in zip(seqs, extra)]
            want = _hf(v, seqs)[0]
            got = enc.forward(kv, 0, extra, starts)
            assert (got - want).abs().max() < ATOL, step
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_rows_that_leave_or_join_change_nothing_for_the_others(tiny):
    enc = lean_encoder(tiny.lm.model)
    prompts = _prompts([30, 12, 50, 7], seed=1)
    with torch.inference_mode():
        kv = SlotKV(enc, 2)
        enc.forward(kv, 0, prompts[:2], [0, 0])
        enc.forward(kv, 2, prompts[2:], [0, 0])  # two rows join into slots 2 and 3
        kv.move([3], [0], max(len(p) for p in prompts))  # rows 0 and 2 leave: row 3 takes slot 0
        got = enc.forward(kv, 0, [[6, 7], [5]], [7, 12])
        want = _hf(tiny, [prompts[3] + [6, 7], prompts[1] + [5]])[0]
    assert (got - want).abs().max() < ATOL


@pytest.mark.parametrize("stay, order", [
    ([1, 3], [3, 1]),  # the last row fills the first hole
    ([0, 1, 2], [0, 1, 2]),  # the last row left: nothing moves
    ([2, 3], [2, 3]),
    ([0, 3], [0, 3]),
    ([], []),
])
def test_a_slot_batch_fills_the_slots_rows_leave_from_its_last_rows(tiny, stay, order):
    from types import SimpleNamespace

    from models.batch_kv import SlotBatch

    batch = SlotBatch(lean_encoder(tiny.lm.model), 4)
    prompts = _prompts([9, 20, 5, 14], seed=4)
    rows = [SimpleNamespace(prompt=p, out=[], new=[]) for p in prompts]
    with torch.inference_mode():
        batch.advance([], rows)
        assert batch.keep(stay) == order
        if not order:
            return
        for b in order:
            rows[b].out, rows[b].new = [40 + b], [40 + b]
        got = batch.advance([rows[b] for b in order], [])
    assert (got - _hf(tiny, [prompts[b] + [40 + b] for b in order])[0]).abs().max() < ATOL


def test_a_long_prefill_routes_tokens_per_expert_and_matches(tiny):
    enc = lean_encoder(tiny.lm.model)
    prompts = _prompts([DENSE_EXPERT_TOKENS + 40, 3], seed=2)  # past the dense-experts threshold
    with torch.inference_mode():
        got = enc.forward(SlotKV(enc, 2), 0, prompts, [0, 0])
    assert (got - _hf(tiny, prompts)[0]).abs().max() < ATOL


def test_greedy_decoding_gives_transformers_tokens(tiny):
    from models.ar_batch import ARBatcher

    prompts = _prompts([40, 9, 77], seed=3)
    batcher = ARBatcher(tiny, max_num_seqs=3, kv_layout="slots")
    try:
        got = [f.result(timeout=120).token_ids for f in [batcher.submit(p, 24) for p in prompts]]
    finally:
        batcher.close()
    assert got == [tuple(g.token_ids) for g in tiny.generate(prompts, 24)]


def test_configurations_it_does_not_reproduce_fall_back(tiny):
    from transformers import DiffusionGemmaForBlockDiffusion

    from models.batch_kv import PaddedBatch, batch_kv

    config = build_config(MICRO)
    config.text_config.use_bidirectional_attention = "all"
    assert lean_encoder(DiffusionGemmaForBlockDiffusion(config).eval()) is None
    assert lean_encoder(DiffusionGemmaForBlockDiffusion(build_config(MICRO)).to(torch.bfloat16)) is None
    assert isinstance(batch_kv(tiny, 4, "padded"), PaddedBatch)
    with pytest.raises(ValueError, match="layout"):
        batch_kv(tiny, 4, "paged")
