"""The one wiring: typed choices (backend x verifier source x where verification runs) -> the role
objects the pipeline talks to. The Ray replicas, the tests and the benchmarks all call it, so what
a test drives is what the app runs.

* :func:`transformers_roles`: a :class:`models.drafter.DiffusionDrafter` and an AR
  :class:`models.verifier.ARVerifier` (the drafter's own weights, or a separate causal checkpoint)
  -> the drafter role (canvas-guided drafts; the verify route in this process, one shared cache
  when the weights are the same, or in rounds against a verifier elsewhere) and the AR role
  (decoding and repair under the grammar);
* :func:`vllm_drafter_role`: a vLLM DiffusionGemma engine -> the drafter role, the verify route in
  rounds against an AR verifier (a co-located vLLM engine or the Verifier deployment);
* :func:`local_pipeline`: the whole pipeline in one process (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.constraints import GRAMMAR_ENGINES
from models.decoding import ConstraintDecoding

from .backends.transformers import TransformersAR, TransformersDrafter
from .health import DrafterHealth, WorkTracker
from .interfaces import ARService, DraftService
from .orchestrator import Pipeline, StructuredPolicy
from .router import RouterPolicy
from .speculation import RoundSpeculation, threaded_draft_canvas
from .validation import RegistryValidator, ValidatorRegistry


@dataclass(frozen=True)
class Wiring:
    """What the serve config decides about the model roles (``deployments/config.py`` builds it)."""

    canvas_guidance: bool = True  # grammar pins and masks inside the denoising loop
    grammar_compile_timeout_s: float = 2.0
    grammar_engines: tuple[str, ...] = GRAMMAR_ENGINES  # tried in order; the first that compiles a constraint decodes it
    verify_draft_steps: int | None = None  # denoising steps per verify-round draft (None: the drafter's)
    verify_draft_width: int | None = None  # canvas tokens sent per round to a verifier elsewhere
    ar_max_num_seqs: int = 8  # AR rows in one running decode batch (models/ar_batch.py)
    ar_kv_layout: str = "auto"  # that batch's KV: slots, padded, or auto (models/batch_kv.py)
    ar_prefix_cache_tokens: int = 8192  # prompt KV kept for later rows (models/prefix_cache.py; slots; 0: off)
    jump_forward: bool = True  # AR decoding appends the text a grammar forces (GrammarProcessor.jump)
    grammar_cache_dir: str | None = None  # compiled grammars kept on disk for the replica's next life


@dataclass
class Roles:
    drafter: DraftService | None
    ar: ARService | None  # None: AR is served elsewhere (a Verifier deployment)
    work: WorkTracker = field(default_factory=WorkTracker)  # the model work in flight here


def grammar_engine(tokenizer, model, eos_ids, compile_timeout_s: float = 2.0,
                   engines: tuple[str, ...] = GRAMMAR_ENGINES, jump_forward: bool = True,
                   cache_dir: str | None = None):
    """The grammar engine for a model's vocabulary (``models/grammar.py``: xgrammar, then llguidance)."""
    from models.grammar import GrammarEngine

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = model.config.get_text_config().vocab_size
    return GrammarEngine(tokenizer, vocab, sorted(eos_ids)[0], pad, compile_timeout_s, engines=engines,
                         jump_forward=jump_forward, cache_dir=cache_dir)


def sudoku_decoding(tokenizer, model, eos_ids):
    """The Sudoku digit masks for a model's vocabulary (None when a digit is not one token)."""
    from models.sudoku_decoding import SudokuDecoding

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        return SudokuDecoding(tokenizer, model.config.get_text_config().vocab_size, sorted(eos_ids)[0], pad)
    except ValueError:
        return None


def transformers_roles(drafter, verifier, wiring: Wiring = Wiring(), remote_verifier=None,
                       work: WorkTracker | None = None) -> Roles:
    """``drafter`` (a ``DiffusionDrafter`` or None) and ``verifier`` (an ``ARVerifier`` or None) ->
    the roles. ``remote_verifier`` (a :class:`models.speculative.RoundVerifier`, e.g. the Verifier
    deployment's handle): the verify route runs in rounds against it and no AR model is held here."""
    from models.drafter import DraftSettings
    from models.speculative import SpeculativeDecoder

    work = work or WorkTracker()
    source = verifier if verifier is not None else drafter
    model = source.lm.model if verifier is not None else drafter.model
    grammar = grammar_engine(source.tokenizer, model, source.eos_ids, wiring.grammar_compile_timeout_s,
                             wiring.grammar_engines, wiring.jump_forward, wiring.grammar_cache_dir)
    decoding = ConstraintDecoding(grammar, sudoku_decoding(source.tokenizer, model, source.eos_ids))
    guidance = decoding if wiring.canvas_guidance else None
    ar = TransformersAR(verifier, decoding, work=work, max_num_seqs=wiring.ar_max_num_seqs,
                        kv_layout=wiring.ar_kv_layout, prefix_cache_tokens=wiring.ar_prefix_cache_tokens
                        ) if verifier is not None else None
    if drafter is None:
        return Roles(None, ar, work)
    if remote_verifier is not None:
        steps = wiring.verify_draft_steps
        settings = None if steps is None else DraftSettings(**{**drafter.settings.__dict__, "max_steps": steps})
        rounds = RoundSpeculation(drafter.tokenizer, threaded_draft_canvas(drafter, settings), remote_verifier,
                                  wiring.verify_draft_width or drafter.canvas_length)
        return Roles(TransformersDrafter(drafter, None, guidance, rounds, work=work), ar, work)
    speculative = SpeculativeDecoder(drafter, verifier, wiring.verify_draft_steps) if verifier is not None else None
    return Roles(TransformersDrafter(drafter, speculative, guidance, work=work), ar, work)


def vllm_drafter_role(engine, tokenizer, verifier=None, wiring: Wiring = Wiring()) -> DraftService:
    """A ``VLLMDiffusion`` engine -> the drafter role; ``verifier`` (a RoundVerifier) serves the
    verify route's rounds."""
    from .backends.vllm import VLLMDrafter

    return VLLMDrafter(engine, tokenizer, verifier, wiring.verify_draft_width, wiring.verify_draft_steps)


def local_pipeline(drafter, verifier, wiring: Wiring = Wiring(), registry: ValidatorRegistry | None = None,
                   policy: RouterPolicy | None = None, health: DrafterHealth | None = None,
                   structured: StructuredPolicy | None = None, work: WorkTracker | None = None) -> Pipeline:
    """The app's pipeline in one process: the same roles the replicas hold, the validator beside them."""
    roles = transformers_roles(drafter, verifier, wiring, work=work)
    return Pipeline(roles.drafter, roles.ar, RegistryValidator(registry), policy, health, structured)
