"""Run the embedded default once from the command line: one structured and one prose answer."""

from __future__ import annotations

import torch

from . import tasks
from .drafter import DiffusionDrafter
from .tokenizer import encode_prompt
from .verifier import ARVerifier


def main() -> None:
    torch.set_num_threads(2)
    drafter = DiffusionDrafter.from_pretrained()
    verifier = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    for ex in (tasks.example("eval", 0, 0, "json"), tasks.example("eval", 0, 0, "prose")):
        ids = encode_prompt(drafter.tokenizer, ex.instruction)
        d = drafter.draft([ids], max_new_tokens=128, seed=0)[0]
        g = verifier.generate([ids], max_new_tokens=128)[0]
        print(f"prompt:  {ex.instruction}\ndrafter: {d.text}  (steps {d.steps_per_canvas})\nAR:      {g.text}\n")


if __name__ == "__main__":
    main()
