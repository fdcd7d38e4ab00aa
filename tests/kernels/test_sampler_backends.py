import pytest
import torch

from kernels import sampler
from kernels.dispatch import ops, sampler_step, select_backend

BACKENDS = ["chunked", "triton"]
CASES = [(4, 256, 1000), (1, 2, 262144)]  # odd vocabulary at full canvas; the real vocabulary, thin


def logits_for(b, c, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, v, generator=g) * 4).to(dtype)
    x[0, 0, : v // 2] = float("-inf")  # a grammar-masked position
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_position_stats_match_the_reference(backend, dtype, shape):
    x = logits_for(*shape, dtype)
    ref = sampler.position_stats(x, 0.7, seed=11)
    got = ops(backend)[0](x, 0.7, seed=11)
    assert torch.equal(got.argmax, ref.argmax)
    assert torch.equal(got.sample, ref.sample)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_soft_embedding_matches_the_reference(backend, dtype, shape):
    x = logits_for(*shape, dtype, seed=1)
    emb = torch.randn(shape[2], 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(ops(backend)[1](x, emb), sampler.soft_embedding(x, emb), atol=2e-5, rtol=1e-4)


def test_gumbel_max_samples_follow_the_softmax():
    # 3 tokens with probabilities 0.6, 0.3, 0.1 at 4096 positions: empirical frequencies match.
    probs = torch.tensor([0.6, 0.3, 0.1])
    x = probs.log().expand(1, 4096, 3).contiguous()
    st = sampler.position_stats(x, 1.0, seed=3)
    freq = torch.bincount(st.sample.flatten(), minlength=3).float() / 4096
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    assert not torch.equal(st.sample, sampler.position_stats(x, 1.0, seed=4).sample)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_sampler_step_is_the_same_on_every_backend(backend):
    x = logits_for(2, 256, 1000, torch.float32)
    canvas = torch.zeros(2, 256, dtype=torch.long)
    ref = sampler_step(x, canvas, 0.1, seed=9, backend="reference")
    got = sampler_step(x, canvas, 0.1, seed=9, backend=backend)
    assert torch.equal(got.canvas, ref.canvas) and torch.equal(got.accepted, ref.accepted)
    assert ref.accepted.any() and not ref.accepted.all()


def test_select_backend(monkeypatch):
    monkeypatch.delenv("DGSERVE_SAMPLER_BACKEND", raising=False)
    assert select_backend("cpu") == "chunked"
    monkeypatch.setenv("DGSERVE_SAMPLER_BACKEND", "triton")
    assert select_backend("cpu") == "triton"
    monkeypatch.setenv("DGSERVE_SAMPLER_BACKEND", "cuda-magic")
    with pytest.raises(ValueError):
        select_backend("cpu")
    with pytest.raises(ValueError):
        ops("nope")
