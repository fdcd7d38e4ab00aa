"""Sudoku on held-out puzzles: what the denoiser, the constraints and the fine-tune each add.

``python -m bench.sudoku --json`` solves ``--n`` held-out puzzles per difficulty
(``models/sudoku.py``: eval split, disjoint by board from training) with five methods:

* ``base``: the extraction checkpoint (``dg-tiny``) prompted with the puzzle, drafting freely;
* ``drafter``: the Sudoku checkpoint (``dg-sudoku``) drafting freely;
* ``drafter+constraints``: the Sudoku checkpoint under :class:`models.sudoku_decoding.SudokuCanvasHook`
  (clues pinned, per-cell digit masks, conflicting acceptances renoised);
* ``ar+masks``: the Sudoku checkpoint's weights decoding left to right, greedy, under the same
  per-cell masks (:class:`models.sudoku_decoding.SudokuProcessor`);
* ``masks-only``: no model: the drafter's own denoising loop and hook with the decoder's output
  replaced by zeros (flat logits), so every step draws among the digits the masks allow at random
  (entropy still orders acceptance: a cell with one digit left is accepted first). What the model
  adds is the gap to this row.

Per row: solved (the validator accepts the board), steps per solve (decoder forwards for the
diffusion rows and ``masks-only``, model choices after the prompt for ``ar+masks``: clues are
fed without one; mean over solved puzzles; ``steps_mean``: over every puzzle), p50 latency. The last line is one JSON object ``{"rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from models import sudoku
from models.drafter import DiffusionDrafter
from models.loading import CHECKPOINTS
from models.sudoku_decoding import SudokuDecoding
from models.tokenizer import encode_prompt
from pipeline.validation import SudokuValidator

METHODS = ("base", "drafter", "drafter+constraints", "ar+masks", "masks-only")


class FlatDecoder(DiffusionDrafter):
    """A drafter whose decoder outputs zeros, so every token gets the same logit: the denoising loop,
    its sampler, stopping rule and hooks are the drafter's own, and the masks alone choose."""

    def decoder_hidden(self, canvas, soft, cache, mask_mapping, positions):
        return torch.zeros(*canvas.shape, self.model.config.get_text_config().hidden_size, device=canvas.device)


def run(methods, difficulties, n: int, seed: int, max_steps: int | None, threads: int,
        overrides: dict | None = None) -> list[dict]:
    from models.verifier import ARVerifier

    torch.set_num_threads(threads)
    validator = SudokuValidator()
    sudoku_drafter = DiffusionDrafter.from_pretrained(CHECKPOINTS / "dg-sudoku")
    if max_steps is not None:
        overrides = {**(overrides or {}), "max_steps": max_steps}
    if overrides:
        sudoku_drafter.settings = replace(sudoku_drafter.settings, **overrides)
    tok = sudoku_drafter.tokenizer
    decoding = SudokuDecoding(tok, sudoku_drafter.vocab_size, 1, 0)
    base = DiffusionDrafter.from_pretrained(CHECKPOINTS / "dg-tiny") if "base" in methods else None
    ar = ARVerifier.from_diffusion_model(sudoku_drafter.model, tok) if "ar+masks" in methods else None
    flat = FlatDecoder(sudoku_drafter.model, tok, sudoku_drafter.settings)
    rows = []
    for difficulty in difficulties:
        puzzles = sudoku.puzzles("eval", seed, n, difficulty)
        for method in methods:
            solved, steps, spent, times = 0, [], [], []
            for i, p in enumerate(puzzles):
                start = time.perf_counter()
                if method == "ar+masks":
                    prompt = encode_prompt(tok, sudoku.prompt(p.puzzle))
                    proc = decoding.processor("sudoku", p.puzzle)
                    g = ar.generate([prompt], 90, logits_processors=[proc])[0]
                    text, used = g.text, proc.choices
                else:
                    d = {"base": base, "masks-only": flat}.get(method, sudoku_drafter)
                    prompt = encode_prompt(d.tokenizer, sudoku.prompt(p.puzzle))
                    guided = method in ("drafter+constraints", "masks-only")
                    hook = decoding.canvas_hook("sudoku", p.puzzle, d.canvas_length) if guided else None
                    draft = d.draft([prompt], max_new_tokens=90, hooks=[hook], seed=seed + i)[0]
                    text, used = draft.text, sum(draft.steps_per_canvas)
                times.append(time.perf_counter() - start)
                spent.append(used)
                if validator.validate(p.puzzle, text).ok:
                    solved += 1
                    steps.append(used)
            rows.append({"difficulty": difficulty, "method": method, "n": len(puzzles), "solved": solved,
                         "solved_rate": round(solved / len(puzzles), 3),
                         "steps_per_solve": round(statistics.mean(steps), 1) if steps else None,
                         "steps_mean": round(statistics.mean(spent), 1),
                         "p50_s": round(statistics.median(times), 3)})
            print(f"{difficulty:7s} {method:20s} solved {solved}/{len(puzzles)}  steps/solve "
                  f"{rows[-1]['steps_per_solve']}  steps (all) {rows[-1]['steps_mean']}  p50 {rows[-1]['p50_s']} s",
                  flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="held-out puzzles per difficulty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", action="append", choices=tuple(sudoku.DIFFICULTIES))
    p.add_argument("--method", action="append", choices=METHODS)
    p.add_argument("--max-steps", type=int, default=None, help="denoising steps per canvas (default: the checkpoint's)")
    p.add_argument("--t-min", type=float, default=None, help="sampler temperature at the last step (default: the checkpoint's)")
    p.add_argument("--t-max", type=float, default=None, help="sampler temperature at the first step")
    p.add_argument("--entropy-bound", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("t_min", a.t_min), ("t_max", a.t_max), ("entropy_bound", a.entropy_bound))
                 if v is not None}
    rows = run(a.method or METHODS, a.difficulty or tuple(sudoku.DIFFICULTIES), a.n, a.seed, a.max_steps, a.threads,
               overrides)
    if a.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
