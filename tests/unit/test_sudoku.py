"""Sudoku: the puzzle generator, the Sudoku checkpoint's tokenizer, constraint-aware denoising
(hand-built canvases, then the real checkpoint) and the AR masks."""

import pytest
import torch

from models import sudoku
from models.drafter import CanvasState
from models.loading import CHECKPOINTS
from models.sudoku_decoding import SudokuDecoding
from pipeline.validation import SudokuValidator

SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"


@pytest.mark.parametrize("difficulty", list(sudoku.DIFFICULTIES))
def test_puzzles_have_one_solution_and_their_grade(difficulty):
    lo, hi = sudoku.DIFFICULTIES[difficulty]
    ps = sudoku.puzzles("eval", 3, 4, difficulty)
    assert ps == sudoku.puzzles("eval", 3, 4, difficulty)  # seeded
    for p in ps:
        assert lo <= p.clues <= hi and p.difficulty == difficulty
        assert sudoku.count_solutions(sudoku.parse(p.puzzle))[0] == 1
        assert sudoku.solve(p.puzzle) == p.solution
        assert SudokuValidator().validate(p.puzzle, p.solution).ok
        assert all(c in ("0", s) for c, s in zip(p.puzzle, p.solution))


def test_training_and_evaluation_boards_are_disjoint():
    held_out = {p.solution for d in sudoku.DIFFICULTIES for p in sudoku.puzzles("eval", 0, 10, d)}
    stream = sudoku.training_stream(0, per_grid=4)
    train = [next(stream) for _ in range(400)]
    assert all(sudoku.split_of(s) == "eval" for s in held_out)
    assert all(sudoku.split_of(p.solution) == "train" for p in train)
    assert not held_out & {p.solution for p in train}
    for p in train[:40]:  # a symmetry of a unique puzzle keeps one solution, which it carries
        assert sudoku.solve(p.puzzle) == p.solution
        assert 25 <= p.clues <= 50


def test_a_puzzle_with_two_solutions_is_counted():
    two = list(sudoku.parse(PUZZLE))
    for i in range(9 * 4):  # empty the top four rows: far from unique
        two[i] = 0
    assert sudoku.count_solutions(two)[0] == 2
    assert sudoku.solve("".join(map(str, two))) is None


def test_the_sudoku_checkpoint_has_one_token_per_cell():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHECKPOINTS / "dg-sudoku")
    ids = tok(SOLUTION, add_special_tokens=False)["input_ids"]
    assert len(ids) == 81 and tok.decode(ids) == SOLUTION
    assert len(tok(sudoku.prompt(PUZZLE), add_special_tokens=False)["input_ids"]) > 81


@pytest.fixture(scope="module")
def decoding():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CHECKPOINTS / "dg-sudoku")
    return SudokuDecoding(tok, 1024, 1, 0)


def _state(decoding, cells: dict[int, int], canvas_length: int = 82, entropy: dict[int, float] | None = None) -> CanvasState:
    """A canvas with ``cells`` ({cell: digit}) accepted and everything else unaccepted noise;
    ``entropy``: the step's entropy at some positions (0 elsewhere)."""
    tokens = torch.full((canvas_length,), 700, dtype=torch.long)
    accepted = torch.zeros(canvas_length, dtype=torch.bool)
    h = torch.zeros(canvas_length)
    for cell, d in cells.items():
        tokens[cell], accepted[cell] = decoding.digits.ids[d - 1], True
    for cell, value in (entropy or {}).items():
        h[cell] = value
    return CanvasState(tokens, accepted, h)


def test_the_hook_pins_clues_and_the_end(decoding):
    hook = decoding.canvas_hook("sudoku", PUZZLE, 82)
    pins = hook.pins(0, [])
    assert {p: t for p, t in pins.items() if p < 81} == {
        i: decoding.digits.ids[int(c) - 1] for i, c in enumerate(PUZZLE) if c != "0"}
    assert pins[81] == 1  # <eos> after the last cell
    # a 64-token canvas: the second canvas starts at cell 64 and ends the board at position 17
    second = decoding.canvas_hook("sudoku", PUZZLE, 64).pins(1, [decoding.digits.ids[0]] * 64)
    assert second[17] == 1 and second[18] == 0
    assert second[79 - 64] == decoding.digits.ids[int(PUZZLE[79]) - 1]


def test_the_mask_leaves_each_open_cell_the_digits_its_peers_allow(decoding):
    hook = decoding.canvas_hook("sudoku", PUZZLE, 82)
    logits = torch.zeros(82, 1024)
    # cell 2 (row 1): row has 5 3 7, column 8, box 6 9 8 -> 1 2 4 allowed
    m = hook.mask(0, 0, [], logits, _state(decoding, {}))
    row = m.allowed[m.positions.tolist().index(2)]
    assert row.nonzero().flatten().tolist() == sorted(decoding.digits.ids[d - 1] for d in (1, 2, 4))
    assert 0 not in m.positions.tolist() and 81 not in m.positions.tolist()  # clues and <eos> are pinned
    # accepting 4 at cell 5 (same row) and 1 at cell 18 (same box) leaves only 2 at cell 2
    m = hook.mask(0, 1, [], logits, _state(decoding, {5: 4, 18: 1}))
    row = m.allowed[m.positions.tolist().index(2)]
    assert row.nonzero().flatten().tolist() == [decoding.digits.ids[1]]
    # an accepted cell keeps its own digit among its choices
    row5 = m.allowed[m.positions.tolist().index(5)]
    assert bool(row5[decoding.digits.ids[3]])


def test_review_keeps_the_most_certain_of_conflicting_acceptances(decoding):
    hook = decoding.canvas_hook("sudoku", PUZZLE, 82)
    # cells 5 and 6 both accept 4 (same row): the more certain one (6) stays, 5 is renoised;
    # cell 8 accepts 8, which agrees with everything
    refused = hook.review(0, 0, [], _state(decoding, {5: 4, 6: 4, 8: 8}, entropy={5: 0.3, 6: 0.01}))
    assert refused.tolist() == [5]
    # equally certain: the first by position stays
    assert hook.review(0, 0, [], _state(decoding, {5: 4, 6: 4})).tolist() == [6]
    # cell 2 takes 5, a clue of its row
    assert hook.review(0, 0, [], _state(decoding, {2: 5})).tolist() == [2]
    assert hook.review(0, 0, [], _state(decoding, {2: 4, 3: 6})) is None
    # cell 2 allows 1 2 4: accepting 4, 1 and 2 at peers leaves it no digit, which frees them
    refused = hook.review(0, 0, [], _state(decoding, {5: 4, 18: 1, 3: 2}))
    assert set(refused.tolist()) == {3, 5, 18}


def test_the_ar_masks_force_clues_and_follow_the_written_cells(decoding):
    proc = decoding.processor("sudoku", PUZZLE)
    ids = decoding.digits.ids
    assert proc.jump([], 10) == [ids[4], ids[2]]  # cells 0, 1 are clues 5 3
    logits = torch.zeros(1, 1024)
    out = proc([ids[4], ids[2]], logits[0])
    assert torch.isfinite(out).nonzero().flatten().tolist() == sorted(ids[d - 1] for d in (1, 2, 4))
    end = proc([ids[0]] * 81, logits[0])
    assert torch.isfinite(end).nonzero().flatten().tolist() == [1]
    assert decoding.longest_prefix("sudoku", PUZZLE, [ids[int(c) - 1] for c in SOLUTION]) == 81
    wrong = [ids[int(c) - 1] for c in SOLUTION]
    wrong[2] = ids[4]  # a second 5 in row 1
    assert decoding.longest_prefix("sudoku", PUZZLE, wrong) == 2


@pytest.fixture(scope="module")
def sudoku_drafter():
    from models.drafter import DiffusionDrafter

    return DiffusionDrafter.from_pretrained(CHECKPOINTS / "dg-sudoku", device="cpu", dtype="float32")


def test_constrained_denoising_solves_held_out_puzzles(sudoku_drafter, decoding):
    """The real checkpoint under the hook: every clue kept, every board 81 digits, and most of a
    handful of held-out medium puzzles solved (bench.sudoku measures the rate)."""
    from models.tokenizer import encode_prompt

    d = sudoku_drafter
    ps = sudoku.puzzles("eval", 11, 6, "medium")
    hooks = [decoding.canvas_hook("sudoku", p.puzzle, d.canvas_length) for p in ps]
    prompts = [encode_prompt(d.tokenizer, sudoku.prompt(p.puzzle)) for p in ps]
    drafts = d.draft(prompts, max_new_tokens=82, hooks=hooks, seed=0)
    solved = 0
    for p, dr in zip(ps, drafts):
        board = dr.text
        assert len(board) == 81 and dr.finished
        assert all(c == "0" or c == b for c, b in zip(p.puzzle, board))
        solved += SudokuValidator().validate(p.puzzle, board).ok
    assert solved >= 4, solved


def test_one_gateway_serves_both_models(drafter, verifier, sudoku_drafter):
    """The extraction model is the default; the Sudoku model is chosen by ``model``, routed by its
    own (static) rules, named in the answer, the model list, the health report and the metrics."""
    import asyncio
    import json

    from models.verifier import ARVerifier
    from pipeline.assemble import local_pipeline
    from pipeline.gateway import Gateway, Limits
    from pipeline.router import RouterPolicy
    from pipeline.telemetry import MemoryMetrics

    solver = local_pipeline(sudoku_drafter, ARVerifier.from_diffusion_model(sudoku_drafter.model, sudoku_drafter.tokenizer),
                            policy=RouterPolicy(kind="static"))
    metrics = MemoryMetrics()
    gw = Gateway(local_pipeline(drafter, verifier), "dgserve-tiny", Limits(max_tokens=128, default_max_tokens=64),
                 metrics=metrics, others={"dgserve-sudoku": solver})

    def chat(body):
        return asyncio.run(gw.chat(json.dumps(body).encode()))

    assert [m["id"] for m in gw.models().body["data"]] == ["dgserve-tiny", "dgserve-sudoku"]
    p = sudoku.puzzles("eval", 5, 1, "easy")[0]
    fmt = {"type": "sudoku", "sudoku": {"puzzle": p.puzzle}}
    reply = chat({"model": "dgserve-sudoku", "messages": [{"role": "user", "content": sudoku.prompt(p.puzzle)}],
                  "response_format": fmt, "max_tokens": 100})
    assert reply.status == 200, reply.body
    assert reply.body["model"] == "dgserve-sudoku" and reply.body["route"]["path"] == "diffusion"
    assert SudokuValidator().validate(p.puzzle, reply.body["choices"][0]["message"]["content"]).ok
    prose = chat({"model": "dgserve-tiny", "messages": [{"role": "user", "content": "Describe Oslo in a few words."}],
                  "route": "ar"})
    assert prose.status == 200 and prose.body["model"] == "dgserve-tiny"
    missing = chat({"model": "dgserve-chess", "messages": [{"role": "user", "content": "e4"}]})
    assert missing.status == 404 and "dgserve-sudoku" in missing.body["error"]["message"]
    assert set(gw.health().body["models"]) == {"dgserve-tiny", "dgserve-sudoku"}
    served = {tags["model"] for name, _, tags in metrics.events if name == "dgserve_requests"}
    assert served == {"dgserve-tiny", "dgserve-sudoku"}  # a name nobody serves makes no label of its own
