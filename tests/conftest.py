import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def dg():
    """The committed tiny DiffusionGemma checkpoint: (model, tokenizer)."""
    from models.loading import load_diffusion_model

    return load_diffusion_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def drafter(dg):
    from models.drafter import DiffusionDrafter

    return DiffusionDrafter(*dg)


@pytest.fixture(scope="session")
def verifier(dg):
    from models.verifier import ARVerifier

    return ARVerifier.from_diffusion_model(*dg)
