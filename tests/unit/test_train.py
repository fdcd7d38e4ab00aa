from models.architecture import MICRO
from models.train import train


def test_trainer_smoke_loss_goes_down(tmp_path):
    model, tok, losses = train(tmp_path / "ckpt", MICRO, steps=40, batch_size=8, lr=3e-3, seed=0, progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert (tmp_path / "ckpt" / "generation_config.json").exists()
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_clean_prefix_keeps_a_prefix_and_maybe_the_padding_clean():
    import torch

    from models.tokenizer import EOS_ID, PAD_ID
    from models.train import clean_prefix

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (256,), generator=gen)
    target = torch.full((256, 48), PAD_ID)
    for i, n in enumerate(lengths.tolist()):
        target[i, : n - 1] = torch.randint(5, 100, (n - 1,), generator=gen)
        target[i, n - 1] = EOS_ID
    assert not clean_prefix(target, 0.0, gen).any()
    clean = clean_prefix(target, 0.5, gen)
    prefixes, tails = 0, 0
    for row, n in zip(clean, lengths.tolist()):
        answer, padding = row[:n], row[n:]
        cut = int(answer.long().argmin()) if not answer.all() else n
        assert not answer[cut:].any()  # the clean part of the answer is a prefix
        assert padding.all() or not padding.any()  # the padding is clean whole or not at all
        prefixes += cut > 0
        tails += bool(padding.all()) and len(padding) > 0
    # about half of the rows get a prefix (cut 0 included), a quarter also their padding
    assert 60 < prefixes < 140 and 30 < tails < 100


def test_ar_loss_on_answer_positions_equals_the_full_head_loss():
    import random

    import torch
    import torch.nn.functional as F
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    from models import tasks
    from models.architecture import build_config
    from models.tokenizer import train_tokenizer
    from models.train import loss_on_batch, make_batch, softcapped_logits

    torch.manual_seed(0)
    tok = train_tokenizer(tasks.corpus_lines(500, 0), MICRO.vocab_size)
    model = DiffusionGemmaForBlockDiffusion(build_config(MICRO)).eval()
    batch = make_batch(tok, [tasks.example("train", 0, i) for i in range(4)], MICRO.canvas_length, random.Random(0))
    # self_cond_p 0 and weight 0: the loss is the AR loss alone
    loss, parts = loss_on_batch(model, batch, torch.Generator().manual_seed(0), self_cond_p=0.0, diffusion_weight=0.0)
    cfg = model.config
    enc = model.model.encoder.language_model(
        input_ids=batch.encoder_ids, attention_mask=batch.encoder_mask.long(),
        position_ids=torch.arange(batch.encoder_ids.shape[1]).unsqueeze(0).expand(4, -1),
        cache=DynamicCache(config=cfg.get_text_config(decoder=True)))
    logits = softcapped_logits(model, enc.last_hidden_state)
    full = F.cross_entropy(logits.reshape(-1, cfg.text_config.vocab_size), batch.ar_labels.reshape(-1), ignore_index=-100)
    assert abs(parts["ar"] - full.item()) < 1e-5
    assert abs(loss.item() - full.item()) < 1e-5


def test_committed_generation_config_is_what_the_trainer_writes():
    """The documented training command (docs/tiny-checkpoint.md) reproduces the committed sampler operating point, and the
    drafter runs at it."""
    import json

    from models.drafter import DraftSettings
    from models.loading import DEFAULT_CHECKPOINT
    from models.train import default_generation_config

    committed = json.loads((DEFAULT_CHECKPOINT / "generation_config.json").read_text())
    written = json.loads(default_generation_config().to_json_string(use_diff=True))  # what save_pretrained writes
    for d in (committed, written):
        d.pop("transformers_version", None)
    assert committed == written
    settings = DraftSettings.from_generation_config(default_generation_config())
    assert settings.confidence_threshold == committed["confidence_threshold"] == 0.05
    assert settings.max_steps == committed["max_denoising_steps"]


def test_a_run_cut_short_resumes_from_its_state_to_the_same_losses(tmp_path):
    """Sudoku fine-tuning with a state file: a second run on the same state picks up at the saved
    step (weights, optimizer, random state and data stream) and computes the same losses."""
    from models.tokenizer import train_tokenizer
    from models import tasks

    tok = train_tokenizer(tasks.corpus_lines(300, 0), MICRO.vocab_size)
    state = tmp_path / "state.pt"
    kw = dict(spec=MICRO, steps=3, batch_size=2, lr=3e-3, seed=0, progress=False, task="sudoku",
              tokenizer=tok, state=state, save_every=2)
    import torch

    _, _, whole = train(None, **kw)
    saved = torch.load(state, weights_only=False)  # saved before step 2
    assert saved["step"] == 2 and saved["losses"] == whole[:2]
    saved["losses"] = [101.0, 102.0]  # marks what the second run takes from the state
    torch.save(saved, state)
    _, sudoku_tok, resumed = train(None, **kw)  # starts at step 2: one step to go
    assert resumed[:2] == [101.0, 102.0]
    # step 2 from the restored weights, optimizer, random state and data: the uninterrupted run's loss
    assert abs(resumed[2] - whole[2]) < 1e-5
    assert len(sudoku_tok("123456789", add_special_tokens=False)["input_ids"]) == 9  # one token per cell
