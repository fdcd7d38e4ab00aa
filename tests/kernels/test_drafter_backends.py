"""The drafter's output does not depend on the sampler backend."""

import torch

from models import tasks
from models.architecture import softcapped
from models.drafter import DiffusionDrafter
from models.tokenizer import encode_prompt
from models.transformers_compat import cache_kwarg


def test_drafts_are_identical_on_every_backend(dg):
    model, tok = dg
    prompts = [encode_prompt(tok, e.instruction) for e in tasks.examples("eval", 61, 4)]
    ref = DiffusionDrafter(model, tok, backend="reference").draft(prompts, 96, seed=3)
    chunked = DiffusionDrafter(model, tok, backend="chunked").draft(prompts, 96, seed=3)
    assert [d.token_ids for d in chunked] == [d.token_ids for d in ref]
    assert [d.steps_per_canvas for d in chunked] == [d.steps_per_canvas for d in ref]
    # the interpreted Triton kernels are slow on CPU: one prompt, one canvas
    one_ref = DiffusionDrafter(model, tok, backend="reference").draft(prompts[:1], 32, seed=5)
    one_tri = DiffusionDrafter(model, tok, backend="triton").draft(prompts[:1], 32, seed=5)
    assert one_tri[0].token_ids == one_ref[0].token_ids


def test_decoder_with_kernel_self_conditioning_equals_transformers(dg):
    model, tok = dg
    drafter = DiffusionDrafter(model, tok, backend="chunked")
    with torch.inference_mode():
        _compare(model, tok, drafter)


def _compare(model, tok, drafter):
    prompt = torch.tensor([encode_prompt(tok, tasks.example("eval", 62, 0).instruction)])
    cache = drafter.new_cache()
    drafter.encode(cache, prompt, torch.ones_like(prompt, dtype=torch.bool), 0)
    n = prompt.shape[1]
    canvas = torch.randint(0, drafter.vocab_size, (1, drafter.canvas_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n, n + drafter.canvas_length).unsqueeze(0)
    make_mask = model.model.decoder.create_diffusion_decoder_attention_mask
    masks = make_mask(config=model.config, inputs_embeds=canvas.unsqueeze(-1), decoder_attention_mask=None,
                      **cache_kwarg(make_mask, cache))
    prev = torch.randn(1, drafter.canvas_length, drafter.vocab_size) * 3
    theirs = model.model.decoder(decoder_input_ids=canvas, **cache_kwarg(model.model.decoder, cache),
                                 self_conditioning_logits=prev,
                                 decoder_attention_mask=masks, decoder_position_ids=positions).last_hidden_state
    soft = drafter._soft_embedding(prev, model.model.decoder.embed_tokens.weight)
    ours = drafter.decoder_hidden(canvas, soft, cache, masks, positions)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(softcapped(model.lm_head(ours)), softcapped(model.lm_head(theirs)), atol=1e-3, rtol=1e-4)
