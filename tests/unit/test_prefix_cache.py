"""Automatic prefix caching on the AR batch's slot KV (models/prefix_cache.py): what a lookup finds,
what the pool gives up when full, and that a row that reads its prompt's KV from the cache gets
the logits and the answer its own prefill gives."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from models import tasks
from models.batch_kv import SlotBatch
from models.causal_encoder import SlotKV, lean_encoder
from models.prefix_cache import PrefixCache
from pipeline.assemble import Wiring, transformers_roles
from pipeline.interfaces import Constraint, Job

ATOL = 1e-4


@pytest.fixture(scope="module")
def encoder(tiny):
    return lean_encoder(tiny.lm.model)


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 1000, (n,), generator=g).tolist() for n in lengths]


def _prefilled(encoder, cache: PrefixCache, prompt) -> None:
    """``prompt`` prefilled into slot 0 of a fresh KV and its full blocks kept in ``cache``."""
    cache.store(*_slot_with(encoder, prompt))


def test_a_lookup_finds_the_blocks_a_prompt_shares_from_its_start(encoder):
    """The module docstring's example, block 4."""
    cache = PrefixCache(encoder, capacity_tokens=64, block=4)
    assert cache.allocated == 0  # the pool grows as blocks come
    _prefilled(encoder, cache, [5, 6, 7, 8, 9, 10, 11, 12, 13])
    assert len(cache) == 2  # two full blocks; the ninth token is not kept
    assert len(cache.lookup([5, 6, 7, 8, 9, 10, 11, 12, 40])) == 2
    assert len(cache.lookup([5, 6, 7, 8, 1, 10, 11, 12])) == 1
    assert len(cache.lookup([6, 5, 7, 8, 9, 10, 11, 12])) == 0
    # the second block alone, at the start of a prompt, is not the same prefix
    assert len(cache.lookup([9, 10, 11, 12, 13])) == 0
    assert len(cache.lookup([5, 6, 7])) == 0  # no full block


def test_a_full_pool_gives_up_the_least_recently_used_block_and_deeper_blocks_before_their_prefix(encoder):
    a, b, c, d = _prompts([8, 8, 4, 4], seed=1)
    cache = PrefixCache(encoder, capacity_tokens=16, block=4)  # four blocks
    _prefilled(encoder, cache, a)
    _prefilled(encoder, cache, b)
    assert len(cache.lookup(a)) == 2  # a used last: b's blocks are the older
    _prefilled(encoder, cache, c)  # a fifth block: b's second block goes, not its first
    assert len(cache.lookup(b)) == 1
    _prefilled(encoder, cache, d)  # now a's second block is the oldest
    assert [len(cache.lookup(p)) for p in (a, b, c, d)] == [1, 1, 1, 1]
    assert len(cache) == cache.allocated == 4  # never past its capacity


def test_capacity_is_at_least_one_block(encoder):
    with pytest.raises(ValueError, match="at least one block"):
        PrefixCache(encoder, capacity_tokens=8, block=16)


def test_rows_that_read_their_prefix_from_the_cache_get_the_logits_of_their_own_prefill(encoder):
    """Rows joining a running batch: one whose whole prompt is cached (its last token is
    prefilled anyway), one sharing two blocks and then going its own way, one sharing nothing;
    against the same rows prefilled in full by a batch without a cache."""
    base, other, tail = _prompts([48, 30, 9], seed=2)
    prompts = [base, base[:32] + tail, other]
    plain, cached = SlotBatch(encoder, 4), SlotBatch(encoder, 4, PrefixCache(encoder, 256))
    starter = [7, 8, 9]
    with torch.inference_mode():
        for batch in (plain, cached):
            batch.advance([], [SimpleNamespace(prompt=starter, out=[], new=[])])
        cached.prefix.store(*_slot_with(encoder, base))  # base's three blocks
        running = SimpleNamespace(prompt=starter, out=[3], new=[3])
        want = plain.advance([running], [SimpleNamespace(prompt=p, out=[], new=[]) for p in prompts])
        got = cached.advance([running], [SimpleNamespace(prompt=p, out=[], new=[]) for p in prompts])
    assert cached.cached_tokens == (len(base) - 1) + 32
    assert plain.cached_tokens == 0
    assert (got - want).abs().max() < ATOL


def _slot_with(encoder, prompt):
    """A fresh KV with ``prompt`` prefilled into slot 0: (kv, 0, prompt)."""
    kv = SlotKV(encoder, 1)
    with torch.inference_mode():
        encoder.forward(kv, 0, [prompt], [0])
    return kv, 0, prompt


def test_the_ar_role_answers_a_repeated_request_from_the_cache_exactly_as_the_first_time(tiny):
    """The same structured requests twice through one AR batch (the app's wiring): the second
    pass reads every prompt's blocks from the cache and gives the same answers, which are the
    answers of the unbatched loop."""
    examples = list(tasks.examples("eval", 71, 6))
    jobs = [Job(messages=(("user", ex.instruction),), prompt=None, max_tokens=40,
                constraint=Constraint("json_schema", ex.schema)) for ex in examples]
    role = transformers_roles(None, tiny, Wiring(ar_max_num_seqs=4, ar_kv_layout="slots")).ar
    try:
        async def run():
            return await asyncio.gather(*[role.generate(j) for j in jobs])

        first = asyncio.run(run())
        between = role.batcher.stats().cached_tokens
        second = asyncio.run(run())
        after = role.batcher.stats().cached_tokens
    finally:
        role.batcher.close()
    assert [r.text for r in second] == [r.text for r in first]
    blocks = 16
    assert after - between >= sum((r.prompt_tokens - 1) // blocks * blocks for r in first)
    from pipeline.tokens import encode_job

    alone = [tiny.generate([encode_job(tiny.tokenizer, j)], j.max_tokens,
                           logits_processors=[role._processor(j)])[0] for j in jobs]
    assert [r.token_ids for r in second] == [tuple(a.token_ids) for a in alone]
