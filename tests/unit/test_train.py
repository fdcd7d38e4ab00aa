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
