"""Sudoku: seeded puzzles with unique solutions, the Sudoku model's prompt and tokenizer, and the
per-cell digit sets that constraint-aware denoising masks with.

A board is 81 characters, row-major; a puzzle writes ``0`` for a blank. Cells are indexed 0..80,
``units(i)`` are the 20 peers of cell ``i`` (its row, column and 3x3 box, itself excluded).

Puzzles are graded by clue count (:data:`DIFFICULTIES`). Splits are disjoint by board: a solution
grid belongs to ``eval`` when a hash of it falls in one bucket of 16, to ``train`` otherwise, so no
grid (and no puzzle cut from it) is in both.

Generation: a random full grid (randomised backtracking), then clues removed in random order while
the puzzle keeps exactly one solution (the solver counts up to two), down to a floor; clues of the
solution are then put back at random up to the drawn count (adding clues keeps a unique puzzle
unique). Training draws many puzzles from each carved grid through the Sudoku symmetries (digit
relabelling, row and column swaps inside a band or stack, band and stack swaps, transposition),
which keep uniqueness, so a training example costs no solver call.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Literal

Split = Literal["train", "eval"]
Difficulty = Literal["easy", "medium", "hard"]

# clue counts per grade (inclusive)
DIFFICULTIES: dict[str, tuple[int, int]] = {"easy": (40, 50), "medium": (32, 39), "hard": (25, 31)}
ALL = 0x1FF  # the nine digits as bits: bit d-1 for digit d

# the 27 units: rows, then columns, then 3x3 boxes (row-major inside each)
UNITS: tuple[tuple[int, ...], ...] = tuple(
    [tuple(r * 9 + c for c in range(9)) for r in range(9)]
    + [tuple(r * 9 + c for r in range(9)) for c in range(9)]
    + [tuple((b // 3 * 3 + k // 3) * 9 + b % 3 * 3 + k % 3 for k in range(9)) for b in range(9)])
# each cell's 20 peers: the other cells of its three units
PEERS: tuple[tuple[int, ...], ...] = tuple(
    tuple(sorted({c for u in UNITS if i in u for c in u} - {i})) for i in range(81))


def peer_bits(board: list[int], cell: int) -> int:
    """The digits (a 9-bit set) ``cell``'s peers hold on ``board`` (81 ints, 0 blank)."""
    used = 0
    for p in PEERS[cell]:
        if board[p]:
            used |= 1 << (board[p] - 1)
    return used


def conflicts(board: list[int]) -> set[int]:
    """Filled cells that share a digit with a filled peer."""
    bad = set()
    for i, v in enumerate(board):
        if v and any(board[p] == v for p in PEERS[i]):
            bad.add(i)
    return bad


def count_solutions(board: list[int], limit: int = 2) -> tuple[int, list[int] | None]:
    """Solutions of ``board`` counted up to ``limit`` (backtracking on the cell with fewest
    candidates), and the first one found."""
    b = list(board)
    if conflicts(b):
        return 0, None
    found: list[list[int]] = []

    def search() -> int:
        best, best_bits, best_n = -1, 0, 10
        rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
        for i, v in enumerate(b):
            if v:
                bit = 1 << (v - 1)
                r, c = divmod(i, 9)
                rows[r] |= bit
                cols[c] |= bit
                boxes[r // 3 * 3 + c // 3] |= bit
        for i, v in enumerate(b):
            if v:
                continue
            r, c = divmod(i, 9)
            bits = ALL & ~(rows[r] | cols[c] | boxes[r // 3 * 3 + c // 3])
            n = bin(bits).count("1")
            if n < best_n:
                best, best_bits, best_n = i, bits, n
                if n <= 1:
                    break
        if best < 0:
            found.append(list(b))
            return 1
        total = 0
        while best_bits:
            bit = best_bits & -best_bits
            best_bits ^= bit
            b[best] = bit.bit_length()
            total += search()
            b[best] = 0
            if total >= limit:
                break
        return total

    n = search()
    return n, (found[0] if found else None)


def solve(puzzle: str) -> str | None:
    """The solution of a puzzle with exactly one, else None."""
    n, sol = count_solutions(parse(puzzle))
    return "".join(map(str, sol)) if n == 1 and sol else None


def parse(board: str) -> list[int]:
    return [0 if ch in "0." else int(ch) for ch in board]


def _full_grid(rng: random.Random) -> list[int]:
    b = [0] * 81

    def fill(i: int) -> bool:
        if i == 81:
            return True
        digits = list(range(1, 10))
        rng.shuffle(digits)
        for d in digits:
            if all(b[p] != d for p in PEERS[i]):
                b[i] = d
                if fill(i + 1):
                    return True
        b[i] = 0
        return False

    fill(0)
    return b


@dataclass(frozen=True)
class Puzzle:
    puzzle: str  # 81 chars, 0 for a blank
    solution: str  # 81 digits 1-9

    @property
    def clues(self) -> int:
        return sum(ch != "0" for ch in self.puzzle)

    @property
    def difficulty(self) -> str:
        return grade(self.clues)


def grade(clues: int) -> str:
    for name, (lo, hi) in DIFFICULTIES.items():
        if lo <= clues <= hi:
            return name
    return "easy" if clues > DIFFICULTIES["easy"][1] else "hard"


def split_of(solution: str) -> Split:
    return "eval" if hashlib.sha256(solution.encode()).digest()[0] % 16 == 0 else "train"


def carve(rng: random.Random, grid: list[int], floor: int) -> list[int]:
    """Remove clues from ``grid`` in random order while the puzzle stays unique, until ``floor``
    clues are left or no clue can go."""
    b = list(grid)
    order = list(range(81))
    rng.shuffle(order)
    left = 81
    for i in order:
        if left <= floor:
            break
        v, b[i] = b[i], 0
        if count_solutions(b, 2)[0] != 1:
            b[i] = v
        else:
            left -= 1
    return b


def _with_clues(rng: random.Random, carved: list[int], grid: list[int], clues: int) -> str:
    b = list(carved)
    blanks = [i for i, v in enumerate(b) if not v]
    rng.shuffle(blanks)
    for i in blanks[: max(0, clues - (81 - len(blanks)))]:
        b[i] = grid[i]
    return "".join(map(str, b))


def _grids(key: str, split: Split) -> Iterator[tuple[random.Random, list[int], str]]:
    """Seeded full grids of ``split``: ``(rng, grid, solution)``, the ``i``-th draw seeded by
    ``key:i`` (draws whose board belongs to the other split are skipped)."""
    attempt = 0
    while True:
        rng = random.Random(f"{key}:{attempt}")
        attempt += 1
        grid = _full_grid(rng)
        sol = "".join(map(str, grid))
        if split_of(sol) == split:
            yield rng, grid, sol


def puzzle(split: Split, seed: int, index: int, difficulty: Difficulty) -> Puzzle:
    """The ``index``-th puzzle of ``difficulty`` in ``split``: deterministic, unique solution."""
    lo, hi = DIFFICULTIES[difficulty]
    for rng, grid, sol in _grids(f"sudoku:{split}:{seed}:{difficulty}:{index}", split):
        clues = rng.randint(lo, hi)
        carved = carve(rng, grid, clues)
        if 81 - carved.count(0) > clues:
            continue  # this grid will not go as low: draw another
        return Puzzle(_with_clues(rng, carved, grid, clues), sol)


def puzzles(split: Split, seed: int, n: int, difficulty: Difficulty) -> list[Puzzle]:
    return [puzzle(split, seed, i, difficulty) for i in range(n)]


def transform(rng: random.Random, p: Puzzle) -> Puzzle:
    """A random Sudoku symmetry applied to puzzle and solution alike (uniqueness is kept)."""
    relabel = list(range(1, 10))
    rng.shuffle(relabel)

    def order() -> list[int]:
        bands = [0, 1, 2]
        rng.shuffle(bands)
        out = []
        for band in bands:
            inner = [0, 1, 2]
            rng.shuffle(inner)
            out += [band * 3 + k for k in inner]
        return out

    rows, cols, flip = order(), order(), rng.random() < 0.5

    def apply(board: str) -> str:
        out = []
        for r in range(9):
            for c in range(9):
                rr, cc = (cols[c], rows[r]) if flip else (rows[r], cols[c])
                v = int(board[rr * 9 + cc])
                out.append(str(relabel[v - 1]) if v else "0")
        return "".join(out)

    return Puzzle(apply(p.puzzle), apply(p.solution))


def training_stream(seed: int, per_grid: int = 48, clue_range: tuple[int, int] = (25, 50)) -> Iterator[Puzzle]:
    """Endless training puzzles: each carved grid gives ``per_grid`` puzzles, each a random symmetry
    of it with clues put back up to a count drawn from ``clue_range``; a symmetric image whose board
    falls in the evaluation split is skipped."""
    for rng, grid, sol in _grids(f"sudoku-train:{seed}", "train"):
        carved = carve(rng, grid, clue_range[0])
        base = Puzzle("".join(map(str, carved)), sol)
        made = 0
        while made < per_grid:
            clues = rng.randint(max(clue_range[0], base.clues), clue_range[1])
            p = transform(rng, Puzzle(_with_clues(rng, parse(base.puzzle), parse(base.solution), clues), sol))
            if split_of(p.solution) == "train":  # a symmetry makes a new board: it must be a training one too
                made += 1
                yield p


# The Sudoku model's user message; the answer is the 81-digit solution (then <eos>).
PROMPT = "Solve this sudoku (0 is a blank, rows left to right, top to bottom): {puzzle}"


def prompt(puzzle_text: str) -> str:
    return PROMPT.format(puzzle=puzzle_text)


def cell_tokenizer(tokenizer):
    """``tokenizer`` with every digit its own token (one token per cell): the extraction model's
    byte-level BPE merges digit runs; a digit pre-tokenizer before it splits them."""
    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.Sequence):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    return tokenizer
