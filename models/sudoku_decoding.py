"""Constraint-aware decoding of a Sudoku board (``response_format: {"type": "sudoku"}``).

The answer is the 81 cells, one digit token each, then ``<eos>``. Decoding uses the same per-cell
digit sets for both paths (``models/sudoku.py:PEERS``):

* in the denoising loop (:class:`SudokuCanvasHook`): clues are pinned, and ``<eos>`` after the
  last cell. Each step every open cell's logits are masked to the digits its row, column and box
  still allow given the clues, the cells committed in earlier canvases and the cells accepted at
  the previous step (an accepted cell keeps its own digit among its choices). A cell its peers
  leave no digit falls back to the digits the clues and committed cells allow, so that a wrong
  acceptance can be undone. After the sampler's update, the accepted cells are kept in order of
  entropy while each agrees with the fixed cells and those kept before it; a cell in conflict is
  renoised instead of accepted. An open cell left with no digit means a wrong guess among the
  kept cells: the canvas starts afresh (every kept cell renoised; clues stay pinned). Entropy
  does the ordering: a cell with one digit left has entropy 0 and is accepted first;
* in AR decoding (:class:`SudokuProcessor`): the next cell is masked to the digits the clues and
  the cells already written allow (a dead end allows every digit, and validation refuses it).

Worked example: in a row ``5 3 _ _ 7 _ _ _ _`` with column and box adding ``6 1 9 8``, the third
cell may only be ``2`` or ``4``; if the step before accepted ``4`` in its box, only ``2`` is left,
its entropy is 0 and it is accepted now.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .constraints import ConstraintKind
from .sudoku import ALL, PEERS, parse, peer_bits


class SudokuDigits:
    """The vocabulary's digit tokens: one token per cell (``models/sudoku.py:cell_tokenizer``)."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, pad_id: int):
        self.ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 10)]  # digit d -> ids[d - 1]
        if any(i is None or i == tokenizer.unk_token_id for i in self.ids):
            raise ValueError("the tokenizer has no single token for every digit")
        self.value = {t: d + 1 for d, t in enumerate(self.ids)}
        self.vocab_size, self.eos_id, self.pad_id = vocab_size, eos_id, pad_id
        self._rows: dict[int, torch.Tensor] = {}

    def allowed_row(self, bits: int) -> torch.Tensor:
        """[vocab] bool: the digit tokens of a 9-bit digit set."""
        row = self._rows.get(bits)
        if row is None:
            row = torch.zeros(self.vocab_size, dtype=torch.bool)
            for d in range(9):
                if bits >> d & 1:
                    row[self.ids[d]] = True
            self._rows[bits] = row
        return row

    def board(self, clues: list[int], committed: Sequence[int]) -> list[int]:
        """The clues (81 ints, 0 open) and the digits of the cells committed so far."""
        b = list(clues)
        for cell, t in enumerate(list(committed)[:81]):
            if not b[cell]:
                b[cell] = self.value.get(int(t), 0)
        return b


class SudokuCanvasHook:
    """Drafter hook for one Sudoku request (see the module doc)."""

    def __init__(self, digits: SudokuDigits, puzzle: str, canvas_length: int):
        self.digits = digits
        self.clues = parse(puzzle)
        self.canvas_length = canvas_length

    def _cells(self, committed: Sequence[int]) -> range:
        """Canvas position p holds cell ``len(committed) + p``."""
        return range(len(committed), len(committed) + self.canvas_length)

    def pins(self, canvas_index: int, committed: Sequence[int]) -> dict[int, int]:
        pins = {}
        for pos, cell in enumerate(self._cells(committed)):
            if cell < 81 and self.clues[cell]:
                pins[pos] = self.digits.ids[self.clues[cell] - 1]
            elif cell == 81:
                pins[pos] = self.digits.eos_id
            elif cell > 81:
                pins[pos] = self.digits.pad_id
        return pins

    def _boards(self, committed: Sequence[int], state) -> tuple[list[int], list[int], list[int]]:
        """(fixed board: clues + committed, board with the accepted cells too, open positions)."""
        fixed = self.digits.board(self.clues, committed)
        board = list(fixed)
        tokens, accepted = state.tokens.tolist(), state.accepted.tolist()
        open_positions = []
        for pos, cell in enumerate(self._cells(committed)):
            if cell >= 81 or fixed[cell]:
                continue
            open_positions.append(pos)
            if accepted[pos]:
                board[cell] = self.digits.value.get(tokens[pos], 0)
        return fixed, board, open_positions

    def mask(self, canvas_index: int, step: int, committed: Sequence[int], logits: torch.Tensor, state):
        from .drafter import PositionMask

        fixed, board, open_positions = self._boards(committed, state)
        if not open_positions:
            return None
        start = len(committed)
        rows = []
        for pos in open_positions:
            cell = start + pos
            bits = ALL & ~peer_bits(board, cell)
            if not bits:
                bits = ALL & ~peer_bits(fixed, cell) or ALL
            rows.append(self.digits.allowed_row(bits))
        return PositionMask(torch.tensor(open_positions), torch.stack(rows))

    def review(self, canvas_index: int, step: int, committed: Sequence[int], after) -> torch.Tensor | None:
        """Accepted cells are kept in order of entropy, most certain first (ties: by position), while
        each agrees with the fixed cells and the cells kept before it; the rest are refused. Then
        an open cell the kept cells leave no digit refuses every kept cell (a fresh start)."""
        fixed = self.digits.board(self.clues, committed)
        start = len(committed)
        tokens, accepted = after.tokens.tolist(), after.accepted.tolist()
        entropy = after.entropy.tolist() if after.entropy is not None else [0.0] * len(tokens)
        board = list(fixed)
        refuse, kept, open_cells = set(), [], []
        order = sorted((entropy[pos], pos) for pos, cell in enumerate(self._cells(committed))
                       if cell < 81 and not fixed[cell])
        for _, pos in order:
            cell = start + pos
            if not accepted[pos]:
                open_cells.append(cell)
                continue
            v = self.digits.value.get(tokens[pos], 0)
            if v and not any(board[p] == v for p in PEERS[cell]):
                board[cell] = v
                kept.append(pos)
            else:
                refuse.add(pos)
        if any(not (ALL & ~peer_bits(board, cell)) for cell in open_cells):
            # an open cell with no digit left: the kept cells hold a wrong guess somewhere, and the
            # cells derived from it support it (each one's mask excludes the others' digits), so
            # freeing the dead cell's peers alone rebuilds the same board: start the canvas afresh
            refuse.update(kept)
        return torch.tensor(sorted(refuse), dtype=torch.long) if refuse else None


class SudokuProcessor:
    """AR logits processor: the next cell masked to the digits its peers leave (module doc)."""

    def __init__(self, digits: SudokuDigits, puzzle: str, prefix: Sequence[int] = ()):
        self.digits = digits
        self.clues = parse(puzzle)
        self.prefix = list(prefix)
        self.choices = 0  # model choices made (forwards after the prompt), for benchmarks

    def jump(self, generated: Sequence[int], room: int) -> list[int]:
        """Clues are forced: the run of clue cells from the next cell on, fed without a model choice."""
        out: list[int] = []
        cell = len(self.prefix) + len(generated)
        while cell < 81 and self.clues[cell] and len(out) < room:
            out.append(self.digits.ids[self.clues[cell] - 1])
            cell += 1
        return out

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self.choices += 1
        written = self.prefix + list(generated)
        cell = len(written)
        if cell >= 81:
            allowed = torch.zeros(self.digits.vocab_size, dtype=torch.bool)
            allowed[self.digits.eos_id] = True
        else:
            board = self.digits.board(self.clues, written)
            clue = self.clues[cell]
            bits = (1 << (clue - 1)) if clue else (ALL & ~peer_bits(board, cell)) or ALL
            allowed = self.digits.allowed_row(bits)
        return logits.masked_fill(~allowed.to(logits.device)[: logits.shape[-1]], float("-inf"))


class SudokuDecoding:
    """The Sudoku side of constraint decoding (``models/decoding.py`` routes kinds here)."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, pad_id: int):
        self.digits = SudokuDigits(tokenizer, vocab_size, eos_id, pad_id)

    @staticmethod
    def supports(kind: str) -> bool:
        return kind == ConstraintKind.SUDOKU

    def canvas_hook(self, kind: str, spec: Any, canvas_length: int) -> SudokuCanvasHook:
        return SudokuCanvasHook(self.digits, spec.replace(".", "0"), canvas_length)

    def processor(self, kind: str, spec: Any, prefix: Sequence[int] = ()) -> SudokuProcessor:
        return SudokuProcessor(self.digits, spec.replace(".", "0"), prefix)

    def longest_prefix(self, kind: str, spec: Any, ids: Sequence[int]) -> int:
        """Leading cells of a draft that keep the clues and break no rule with the cells before."""
        clues = parse(spec.replace(".", "0"))
        board = [0] * 81
        for cell, t in enumerate(list(ids)[:81]):
            v = self.digits.value.get(int(t), 0)
            if not v or (clues[cell] and clues[cell] != v):
                return cell
            if any(board[p] == v or clues[p] == v for p in PEERS[cell]):
                return cell
            board[cell] = v
        return min(len(ids), 81)
