"""Block-diffusion training of a tiny ``DiffusionGemmaForBlockDiffusion`` on the synthetic tasks.

Objective per example (transformers ships no DiffusionGemma loss):

* the answer (``target + <eos>``, padded with ``<pad>`` to whole canvases) is cut into canvases;
  one canvas ``k`` is drawn among those holding answer tokens;
* the causal encoder reads ``prompt + answer`` once; its KV cache is the decoder's context, masked
  so that canvas ``k`` sees only ``prompt + answer[: k * canvas]`` (the encoder is causal, so the
  keys before that point do not depend on what follows);
* noise level ``t ~ U(eps, 1)`` (``--noise-power k``: ``t = u ** (1 / k)``, more heavy noise): each
  canvas token is replaced by a uniform random token with probability ``t`` (no mask token, as in
  DiffusionGemma's sampler);
* diffusion loss: cross-entropy of the decoder on all canvas positions;
* self-conditioning on half of the batches: the decoder first runs without gradient, and its
  logits are fed back through ``self_conditioning_logits``;
* causal loss: next-token cross-entropy of the encoder (through the tied, softcapped head) on the
  answer, so the same weights also decode autoregressively.

Run: ``python -m models.train --out models/checkpoints/dg-tiny`` (docs/tiny-checkpoint.md has the exact command).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import tasks
from .architecture import MICRO, ModelSpec, build_config, softcapped
from .tokenizer import EOS_ID, PAD_ID, encode_prompt, train_tokenizer
from .transformers_compat import cache_kwarg


@dataclass(frozen=True)
class Batch:
    encoder_ids: torch.Tensor  # [batch, seq] prompt + answer, right-padded with <pad>
    encoder_mask: torch.Tensor  # [batch, seq] bool, True on real tokens
    ar_labels: torch.Tensor  # [batch, seq] next-token labels on answer positions, -100 elsewhere
    context_len: torch.Tensor  # [batch] tokens the drawn canvas may attend to
    canvas_target: torch.Tensor  # [batch, canvas] clean tokens of the drawn canvas


def make_batch(tokenizer, exs: list[tasks.Example], canvas_length: int, rng: random.Random) -> Batch:
    rows, labels, ctx, canv = [], [], [], []
    for ex in exs:
        prompt = encode_prompt(tokenizer, ex.instruction)
        answer = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [EOS_ID]
        n_canvases = math.ceil(len(answer) / canvas_length)
        k = rng.randrange(n_canvases)
        padded = answer + [PAD_ID] * (n_canvases * canvas_length - len(answer))
        seq = prompt + answer
        rows.append(seq)
        lab = [-100] * len(seq)
        for i in range(len(prompt) - 1, len(seq) - 1):
            lab[i] = seq[i + 1]
        labels.append(lab)
        ctx.append(len(prompt) + k * canvas_length)
        canv.append(padded[k * canvas_length:(k + 1) * canvas_length])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
        lab_t[i, : len(lab)] = torch.tensor(lab)
    return Batch(ids, mask, lab_t, torch.tensor(ctx), torch.tensor(canv, dtype=torch.long))


def clean_prefix(canvas_target: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """[batch, canvas] bool: positions kept clean, for a fraction ``p`` of the rows: those before a
    cut drawn uniformly in ``0..n`` (``n``: the row's tokens up to and including ``<eos>``), and in
    half of those rows also the padding after the answer.

    The entropy-bound sampler settles a canvas roughly from its confident left part rightwards, and
    the padding after ``<eos>`` early, so at inference the decoder often sees a settled prefix (and
    tail) around a noisy middle; independent noise almost never shows it long clean prefixes (at
    ``t = 0.5`` the first 10 positions are all clean one time in a thousand)."""
    bsz, canvas = canvas_target.shape
    real = (canvas_target != PAD_ID).sum(1)  # answer tokens (with <eos>) in the canvas
    cut = (torch.rand(bsz, generator=gen) * (real + 1).float()).long()
    chosen = torch.rand(bsz, generator=gen) < p
    tail = chosen & (torch.rand(bsz, generator=gen) < 0.5)
    pos = torch.arange(canvas).unsqueeze(0)
    return (chosen.unsqueeze(1) & (pos < cut.unsqueeze(1))) | (tail.unsqueeze(1) & (pos >= real.unsqueeze(1)))


def softcapped_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return softcapped(model.lm_head(hidden))


def loss_on_batch(model, batch: Batch, gen: torch.Generator, self_cond_p: float = 0.5,
                  eps: float = 1e-3, diffusion_weight: float = 1.0,
                  noise_draws: int = 1, prefix_p: float = 0.0,
                  noise_power: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    from transformers import DynamicCache

    cfg = model.config
    vocab = cfg.text_config.vocab_size
    bsz, width = batch.encoder_ids.shape
    canvas = batch.canvas_target.shape[1]

    cache = DynamicCache(config=cfg.get_text_config(decoder=True))
    lm = model.model.encoder.language_model
    enc = lm(
        input_ids=batch.encoder_ids,
        attention_mask=batch.encoder_mask.long(),
        position_ids=torch.arange(width).unsqueeze(0).expand(bsz, -1),
        **cache_kwarg(lm, cache),
    )
    # The head runs on the answer positions only (the prompt has no next-token labels): same loss,
    # about a fifth of the encoder-side head work (answers are ~25 of ~130 tokens).
    labeled = batch.ar_labels != -100
    ar_logits = softcapped_logits(model, enc.last_hidden_state[labeled])
    ar_loss = F.cross_entropy(ar_logits, batch.ar_labels[labeled])

    positions = torch.arange(width).unsqueeze(0)
    visible = (positions < batch.context_len[:, None]) & batch.encoder_mask
    dec_mask = torch.cat([visible, torch.ones(bsz, canvas, dtype=torch.bool)], dim=1)
    dec_pos = batch.context_len[:, None] + torch.arange(canvas).unsqueeze(0)

    def decode(noised, sc_logits):
        out = model.model.decoder(
            decoder_input_ids=noised,
            **cache_kwarg(model.model.decoder, cache),
            self_conditioning_logits=sc_logits,
            self_conditioning_mask=None,
            decoder_attention_mask=dec_mask,
            decoder_position_ids=dec_pos,
        )
        return softcapped_logits(model, out.last_hidden_state)

    # ``noise_draws`` noise levels per example share one encoder pass (the decoder only reads its
    # cache), so each extra draw costs a decoder pass, not an example.
    diff_loss = torch.zeros(())
    for _ in range(noise_draws):
        t = torch.rand(bsz, 1, generator=gen) ** (1.0 / noise_power) * (1 - eps) + eps
        noise = torch.rand(bsz, canvas, generator=gen) < t
        if prefix_p > 0:
            noise = noise & ~clean_prefix(batch.canvas_target, prefix_p, gen)
        random_tokens = torch.randint(0, vocab, (bsz, canvas), generator=gen)
        noised = torch.where(noise, random_tokens, batch.canvas_target)
        # Self-conditioning on a fraction of the batches (not rows), so the extra no-grad decoder
        # pass is paid only where it is used.
        sc_logits = None
        if torch.rand(1, generator=gen).item() < self_cond_p:
            with torch.no_grad():
                sc_logits = decode(noised, None).detach()
        logits = decode(noised, sc_logits)
        diff_loss = diff_loss + F.cross_entropy(logits.reshape(-1, vocab), batch.canvas_target.reshape(-1))
    diff_loss = diff_loss / noise_draws
    loss = diffusion_weight * diff_loss + ar_loss
    return loss, {"diffusion": diff_loss.item(), "ar": ar_loss.item()}


# The committed checkpoint's stopping threshold: mean canvas entropy (nats) under which a stable canvas
# stops (docs/tiny-checkpoint.md: the operating-point table).
CONFIDENCE_THRESHOLD = 0.05


def default_generation_config(max_new_tokens: int = 256, confidence_threshold: float = CONFIDENCE_THRESHOLD):
    """The checkpoint's sampler operating point (docs/tiny-checkpoint.md: the sampler sweep)."""
    from transformers import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig,
    )

    return DiffusionGemmaGenerationConfig(
        max_new_tokens=max_new_tokens,
        max_denoising_steps=16,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=confidence_threshold,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=2,
    )


def sudoku_generation_config():
    """The Sudoku checkpoint's operating point: one canvas (81 cells + <eos>), more steps than
    the extraction model's 16 (a board settles a few cells at a time), and temperatures 4 -> 3
    (the extraction model's: 0.8 -> 0.4): the tiny model is confident where it is wrong, and a flatter distribution leaves the
    cells the masks decide (entropy 0) to be accepted before its guesses (docs/sudoku.md: the
    temperature sweep, on puzzles apart from the reported ones)."""
    gc = default_generation_config(max_new_tokens=82)
    gc.max_denoising_steps = 48
    gc.t_min, gc.t_max = 3.0, 4.0
    return gc


def batches(tokenizer, batch_size: int, seed: int, bucket: int = 1):
    """Training batches of examples, endless. ``bucket > 1``: draw ``bucket`` batches' worth of
    consecutive examples, sort them by token length, cut them into batches and yield those in a
    seeded random order, so that a batch pads to its own longest row rather than to the longest of
    a random draw (the same examples, each once, with less padding)."""
    order = random.Random(seed ^ 0x5EED)
    index = 0
    while True:
        pool = [tasks.example("train", seed, index + i) for i in range(batch_size * bucket)]
        index += len(pool)
        if bucket > 1:
            pool.sort(key=lambda ex: len(tokenizer(ex.instruction + ex.target)["input_ids"]))
        group = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
        if bucket > 1:
            order.shuffle(group)
        yield from group


def sudoku_batches(batch_size: int, seed: int):
    """Training batches of Sudoku puzzles (``models/sudoku.py:training_stream``), endless; all rows
    have the same length, so no bucketing."""
    from . import sudoku

    stream = sudoku.training_stream(seed)
    while True:
        yield [tasks.Example("prose", sudoku.prompt(p.puzzle), None, p.solution)
               for p in (next(stream) for _ in range(batch_size))]


def train(out: Path | None, spec: ModelSpec, steps: int, batch_size: int, lr: float, seed: int,
          tokenizer=None, max_minutes: float | None = None, progress: bool = True,
          log_every: int = 50, diffusion_weight: float = 1.0, bucket: int = 16,
          implementation: str = "eager", noise_draws: int = 1,
          prefix_p: float = 0.0, noise_power: float = 1.0,
          confidence_threshold: float = CONFIDENCE_THRESHOLD, task: str = "extraction",
          init: Path | None = None, state: Path | None = None, save_every: int = 100,
          generation_config=None) -> tuple[object, object, list[float]]:
    """Train and (when ``out`` is set) save model, generation config and tokenizer to ``out``.

    ``task``: ``extraction`` (``models/tasks.py``) or ``sudoku`` (``models/sudoku.py``; one token
    per cell). ``init``: a checkpoint to fine-tune (its tokenizer too) instead of fresh weights;
    ``spec.canvas_length`` is set on it. ``state``: a file the run saves itself to every ``save_every`` steps
    (weights, optimizer, step, random state) and resumes from when it exists, so a run cut short
    goes on where it stopped; the data stream is replayed to the saved step.
    ``implementation``: ``sdpa`` (attention by torch SDPA, experts by transformers' default) or
    ``eager`` (eager attention and experts: about 10% faster at this size on CPU).
    Returns ``(model, tokenizer, losses)``.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(init, dtype=torch.float32)
        model.config.canvas_length = spec.canvas_length
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(init)
    else:
        model = DiffusionGemmaForBlockDiffusion(build_config(spec))
    if tokenizer is None:
        tokenizer = train_tokenizer(tasks.corpus_lines(20000, seed), spec.vocab_size)
    if task == "sudoku":
        from .sudoku import cell_tokenizer

        tokenizer = cell_tokenizer(tokenizer)
    if implementation == "eager":
        model.set_experts_implementation("eager")
    model.config._attn_implementation = implementation
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(200, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    losses: list[float] = []
    first = 0
    stream = sudoku_batches(batch_size, seed) if task == "sudoku" else batches(tokenizer, batch_size, seed, bucket)
    if state is not None and state.exists():
        saved = torch.load(state, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        first, losses = saved["step"], saved["losses"]
        rng.setstate(saved["rng"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch"])
        for _ in range(first):
            next(stream)
        print(f"resumed from {state} at step {first}")
    start = time.monotonic()
    bar = tqdm(range(first, steps), disable=not progress, desc="train", mininterval=5)
    for step in bar:
        if state is not None and step > first and step % save_every == 0:
            tmp = state.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "losses": losses, "rng": rng.getstate(), "gen": gen.get_state(),
                        "torch": torch.get_rng_state()}, tmp)
            tmp.replace(state)
        exs = next(stream)
        batch = make_batch(tokenizer, exs, spec.canvas_length, rng)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, parts = loss_on_batch(model, batch, gen, diffusion_weight=diffusion_weight, noise_draws=noise_draws,
                                     prefix_p=prefix_p, noise_power=noise_power)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", diff=f"{parts['diffusion']:.3f}", ar=f"{parts['ar']:.3f}")
        if max_minutes is not None and time.monotonic() - start > max_minutes * 60:
            break
    model.eval()
    model.generation_config = generation_config or default_generation_config(confidence_threshold=confidence_threshold)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return model, tokenizer, losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--micro", action="store_true", help="micro config for smoke runs")
    p.add_argument("--canvas-length", type=int, default=None, help="canvas length (default: the spec's 64)")
    p.add_argument("--diffusion-weight", type=float, default=1.0, help="weight of the diffusion loss (AR: 1)")
    p.add_argument("--bucket", type=int, default=16,
                   help="sort this many batches' worth of examples by length before batching (1: off)")
    p.add_argument("--noise-draws", type=int, default=1,
                   help="noise levels drawn per example for the decoder (one shared encoder pass)")
    p.add_argument("--prefix-noise", type=float, default=0.0,
                   help="fraction of rows whose canvas keeps a clean prefix of random length")
    p.add_argument("--noise-power", type=float, default=1.0,
                   help="noise level t = u ** (1 / k), u ~ U(0, 1): k > 1 trains more on heavy noise (mean k / (k + 1))")
    p.add_argument("--confidence-threshold", type=float, default=CONFIDENCE_THRESHOLD,
                   help="the saved generation_config's stopping threshold (sampler operating point)")
    p.add_argument("--implementation", choices=("sdpa", "eager"), default="eager",
                   help="attention/experts implementation while training")
    p.add_argument("--task", choices=("extraction", "sudoku"), default="extraction",
                   help="training data: the synthetic extraction tasks, or Sudoku puzzles (one token per cell)")
    p.add_argument("--init", type=Path, default=None, help="fine-tune this checkpoint instead of fresh weights")
    p.add_argument("--state", type=Path, default=None,
                   help="save the run here every 100 steps and resume from it when it exists")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = MICRO if a.micro else ModelSpec()
    if a.canvas_length is not None:
        from dataclasses import replace

        spec = replace(spec, canvas_length=a.canvas_length)
    _, _, losses = train(a.out, spec, a.steps, a.batch_size, a.lr, a.seed, max_minutes=a.max_minutes,
                         diffusion_weight=a.diffusion_weight, bucket=a.bucket,
                         implementation=a.implementation, noise_draws=a.noise_draws,
                         prefix_p=a.prefix_noise, noise_power=a.noise_power,
                         confidence_threshold=a.confidence_threshold, task=a.task, init=a.init,
                         state=a.state, generation_config=sudoku_generation_config() if a.task == "sudoku" else None)
    print(f"steps={len(losses)} first_loss={losses[0]:.4f} last_loss={sum(losses[-20:]) / min(20, len(losses)):.4f}")


if __name__ == "__main__":
    main()
