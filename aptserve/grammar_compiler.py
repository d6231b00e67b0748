"""GrammarCompiler: structured-output constraints compiled against the model's tokenizer, once per text.

Built at start-up in each process that compiles (the front end, to check a constraint at the door; the engine
core, to run it), so no request pays for the tokenizer view llguidance needs (about a second) and no step builds
it. Compiling runs llguidance's own checks with the tokenizer: grammar size and parser limits, the lexer's
precomputation, and the first mask (a grammar that can produce nothing, e.g. `a: a`, fails there). Whatever it
refuses is an InvalidRequestError with the compiler's message. Compiled grammars, and refusals, are kept in a
bounded LRU keyed by the constraint's text, so a grammar already seen is never compiled again (a hostile one that
took seconds to refuse costs nothing the second time).

Compiling may take seconds (llguidance drops the GIL meanwhile): callers on an event loop or a step loop run
`compile` in a worker thread. Thread-safe.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Sequence

from aptserve.errors import InvalidRequestError
from aptserve.structured_output import StructuredOutput

logger = logging.getLogger(__name__)

# Compiled grammars kept (a lexer of a large grammar holds megabytes).
CACHE_SIZE = 128
# Any of these in a model folder means it has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Of a compiler message in an error answer (a regex error quotes the regex).
MAX_MESSAGE_CHARS = 1000


def _limits():
    """llguidance's defaults, but errors without the parser's state (a dump of the grammar, not a reason)."""
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)


def build_ll_tokenizer(tokenizer_dir: str, vocab_size: int, eos_token_ids: Sequence[int]):
    """The tokenizer as llguidance sees it, the same in every process: read from the folder's tokenizer.json
    (0.4 s, no transformers import in the engine core) where there is one, else through transformers."""
    import llguidance

    eos = list(eos_token_ids) or None
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if os.path.isfile(path):
        return llguidance.LLTokenizer(path, n_vocab=vocab_size, eos_token=eos)
    import llguidance.hf

    from aptserve.registry import load_tokenizer

    return llguidance.hf.from_tokenizer(load_tokenizer(tokenizer_dir), n_vocab=vocab_size, eos_token=eos)


class GrammarCompiler:
    def __init__(self, tokenizer_dir: str, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = CACHE_SIZE) -> None:
        self.ll_tokenizer = build_ll_tokenizer(tokenizer_dir, vocab_size, eos_token_ids)
        self.cache_size = cache_size
        # constraint -> a compiled matcher at its start (copied for each request) or the refusal's message
        self._compiled: collections.OrderedDict[StructuredOutput, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0  # compilations run (cache misses), for tests and logs

    @classmethod
    def for_model(cls, model_config) -> GrammarCompiler | None:
        """The compiler for a ModelConfig's tokenizer; None for a folder without one (token ids only) or one
        llguidance cannot take (e.g. more tokens than the model's vocabulary): the engine serves, without
        structured output."""
        if model_config.path is None or not any(os.path.isfile(os.path.join(model_config.path, name))
                                                for name in TOKENIZER_FILES):
            return None
        try:
            return cls(model_config.path, model_config.vocab_size, model_config.eos_token_ids)
        except ValueError as exc:
            logger.warning("structured output unavailable: llguidance cannot take this tokenizer (%s)", exc)
            return None

    def cached(self, structured: StructuredOutput):
        """The compiled matcher if this constraint compiled before (InvalidRequestError if it was refused), else
        None: never compiles."""
        with self._lock:
            found = self._compiled.get(structured)
            if found is not None:
                self._compiled.move_to_end(structured)
        if isinstance(found, str):
            raise InvalidRequestError(found)
        return found

    def compile(self, structured: StructuredOutput):
        """The compiled matcher at its start (shared: copy it, `matcher()`), or InvalidRequestError saying why the
        constraint cannot be used."""
        found = self.cached(structured)
        if found is not None:
            return found
        try:
            result = self._compile(structured)
        except InvalidRequestError as exc:
            result = str(exc)
        with self._lock:
            self.num_compiles += 1
            self._compiled[structured] = result
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        if isinstance(result, str):
            raise InvalidRequestError(result)
        return result

    def matcher(self, structured: StructuredOutput):
        """A fresh matcher of its own for one request (a copy of the compiled one: microseconds)."""
        return self.compile(structured).deep_copy()

    def _compile(self, structured: StructuredOutput):
        from llguidance import LLMatcher

        grammar = structured.grammar()
        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_limits())
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask: refuses a grammar that cannot start
        if matcher.is_error():
            raise InvalidRequestError(f"the {structured.kind} constraint cannot be used: {_reason(matcher)}")
        return matcher


def _reason(matcher) -> str:
    """The compiler's message (its first kilobyte); a grammar that stops before its first byte gets only a stop
    reason from llguidance (e.g. NoExtensionBias), so say what that means."""
    error = matcher.get_error().replace("<non-verbose/>", "").strip() or matcher.stop_reason()
    if error.startswith("NoExtension"):
        return f"it matches no text ({error}: the grammar cannot produce a first byte)"
    return error[:MAX_MESSAGE_CHARS]
