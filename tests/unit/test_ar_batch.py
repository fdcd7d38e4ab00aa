"""Continuous batching of AR decoding (models/ar_batch.py) through the AR role the replicas run:
concurrent requests share one running batch and each gets exactly the answer it gets alone, in
either layout of the batch's KV (models/batch_kv.py)."""

import asyncio
import time

import pytest

from models import tasks
from models.ar_batch import ARBatcher
from models.verifier import ARVerifier
from pipeline.assemble import Wiring, transformers_roles
from pipeline.interfaces import Constraint, Job
from pipeline.tokens import encode_job

EXAMPLES = list(tasks.examples("eval", 61, 10))


@pytest.fixture(scope="module")
def verifier():
    return ARVerifier.from_pretrained(None, "diffusion", "cpu")


@pytest.fixture(scope="module", params=["slots", "padded"])
def ar(verifier, request):
    role = transformers_roles(None, verifier, Wiring(ar_max_num_seqs=8, ar_kv_layout=request.param)).ar
    yield role
    role.batcher.close()


def _jobs(structured: bool) -> list[Job]:
    return [Job(messages=(("user", ex.instruction),), prompt=None, max_tokens=48,
                constraint=Constraint("json_schema", ex.schema) if structured else None) for ex in EXAMPLES]


def _alone(verifier, ar, job: Job):
    """The same request decoded by itself, by the unbatched loop of ARVerifier.generate."""
    processor = ar._processor(job)
    return verifier.generate([encode_job(verifier.tokenizer, job)], job.max_tokens, temperature=job.temperature,
                             logits_processors=[processor], seed=job.seed)[0]


async def _staggered(calls):
    """Start the calls a few at a time, so rows join a batch that is already running."""
    tasks_ = []
    for i, call in enumerate(calls):
        tasks_.append(asyncio.ensure_future(call()))
        if i % 3 == 2:
            await asyncio.sleep(0.05)
    return await asyncio.gather(*tasks_)


@pytest.mark.parametrize("structured", [True, False])
def test_concurrent_requests_each_get_the_answer_they_get_alone(verifier, ar, structured):
    jobs = _jobs(structured)
    want = [_alone(verifier, ar, j) for j in jobs]
    before = ar.batcher.stats()
    got = asyncio.run(_staggered([lambda j=j: ar.generate(j) for j in jobs]))
    after = ar.batcher.stats()
    assert [g.token_ids for g in got] == [tuple(w.token_ids) for w in want]
    assert [g.finished for g in got] == [w.finished for w in want]
    assert all(g.stats.constrained is structured for g in got)
    assert after.peak_rows > 1  # they really shared the batch
    assert after.splices > before.splices  # and rows joined it while it ran
    # fewer forwards than one request at a time would take
    assert after.steps - before.steps < sum(len(w.token_ids) + 1 for w in want)


@pytest.mark.parametrize("layout", ["slots", "padded"])
def test_a_row_longer_than_the_running_batch_joins_it_without_a_rebuild(verifier, layout):
    """Short rows start a batch; a row whose prompt is longer than the batch joins it after the
    first step (submitted from that step's token callback): the rows are not prefilled again (the
    padded layout pads the running cache on the left: a widening), and every row gets the tokens
    it gets alone."""
    batcher = ARBatcher(verifier, max_num_seqs=4, kv_layout=layout)
    tok = verifier.tokenizer
    short = [encode_job(tok, Job(messages=(("user", t),), prompt=None, max_tokens=32))
             for t in ("Name a colour.", "Describe Oslo.", "Name a city.")]
    long_text = "Extract the data as JSON. " + " ".join(ex.instruction for ex in EXAMPLES[:2])
    long = encode_job(tok, Job(messages=(("user", long_text),), prompt=None, max_tokens=24))
    assert len(long) > max(len(p) for p in short) + 32
    joined = []

    def after_first_token(_tok):
        if not joined:
            joined.append(batcher.submit(long, 24))

    try:
        futures = [batcher.submit(p, 32, on_token=after_first_token if i == 0 else None) for i, p in enumerate(short)]
        got = [f.result(timeout=120) for f in futures]
        got.append(joined[0].result(timeout=120))
        stats = batcher.stats()
    finally:
        batcher.close()
    want = [verifier.generate([p], n)[0] for p, n in zip(short + [long], [32, 32, 32, 24])]
    assert [g.token_ids for g in got] == [tuple(w.token_ids) for w in want]
    assert stats.rebuilds == 1 and stats.splices >= 1  # the first rows' prefill, then the join
    # every token but the ones jumped over comes from one row in one step
    assert sum(len(g.token_ids) for g in got) <= stats.row_steps <= stats.steps * stats.peak_rows
    assert stats.row_steps >= max(len(g.token_ids) for g in got) and stats.forward_s > 0 and stats.pick_s > 0
    assert stats.widenings >= (layout == "padded")


def test_concurrent_streams_deliver_every_token_and_the_answer_alone(verifier, ar):
    jobs = _jobs(True)[:6]
    want = [_alone(verifier, ar, j) for j in jobs]

    async def collect(job):
        return [c async for c in ar.stream(job)]

    streams = asyncio.run(_staggered([lambda j=j: collect(j) for j in jobs]))
    for chunks, w in zip(streams, want):
        assert "".join(c.text for c in chunks) == w.text == chunks[-1].result.text
        assert chunks[-1].result.token_ids == tuple(w.token_ids)
        assert len([c for c in chunks if c.text]) > 1  # per-token delivery, not one block


def test_a_seeded_sampled_row_draws_what_it_draws_alone(verifier, ar):
    job = Job(messages=(("user", EXAMPLES[0].instruction),), prompt=None, max_tokens=32, temperature=0.9, seed=7)
    want = _alone(verifier, ar, job)
    others = [Job(messages=(("user", ex.instruction),), prompt=None, max_tokens=32, temperature=0.9, seed=i)
              for i, ex in enumerate(EXAMPLES[1:5])]
    got = asyncio.run(_staggered([lambda j=j: ar.generate(j) for j in [*others[:2], job, *others[2:]]]))
    assert got[2].token_ids == tuple(want.token_ids)


def test_rows_leave_at_their_deadline_or_when_cancelled_and_the_batch_goes_on(verifier):
    batcher = ARBatcher(verifier, max_num_seqs=4)
    prompt = encode_job(verifier.tokenizer, _jobs(False)[0])

    def no_eos(generated, logits):  # rows run to their budget, however fast the machine
        logits = logits.clone()
        logits[sorted(verifier.eos_ids)] = float("-inf")
        return logits

    long = batcher.submit(prompt, 400, processor=no_eos)
    cancelled = batcher.submit(prompt, 400, processor=no_eos)
    late = batcher.submit(prompt, 400, processor=no_eos, deadline=time.time() + 0.2)
    cancelled.cancel()
    g = late.result(timeout=60)
    assert g.expired and not g.finished and 0 < len(g.token_ids) < 400
    short = batcher.generate(prompt, 5, processor=no_eos)
    assert len(short.token_ids) <= 5
    assert long.result(timeout=300).token_ids[:5] == short.token_ids


def test_limits_are_checked_when_a_row_is_submitted(verifier):
    batcher = ARBatcher(verifier, max_num_seqs=2, max_batch_tokens=64)
    with pytest.raises(ValueError, match="exceeds"):
        batcher.submit([1] * 40, 30)
    with pytest.raises(ValueError, match="positive"):
        batcher.submit([1], 0)


def test_a_closed_batcher_fails_its_rows_and_takes_no_more(verifier):
    batcher = ARBatcher(verifier, max_num_seqs=2)
    prompt = encode_job(verifier.tokenizer, _jobs(False)[0])
    assert len(batcher.generate(prompt, 3).token_ids) <= 3
    running = batcher.submit(prompt, 400)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        running.result(timeout=60)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(prompt, 3)
