"""Structured output: what a request constrains its text to, and that constraint as an llguidance grammar.

The kinds are vLLM's `structured_outputs` choices (OpenAI's `response_format` maps onto the first two):
- json: a JSON schema (text); json_object: any JSON object;
- regex: a regular expression (Rust regex syntax); choice: one of a list of strings (JSON-encoded list);
- grammar: a Lark grammar in llguidance's dialect.

The backend is llguidance (the constrained-decoding library vLLM and llama.cpp also use). Measured at batch 32
(benchmarks/sampling_features.py), xgrammar fills the masks faster (0.1 vs 1.1 ms per step) but either is about 1%
of a step there, and xgrammar pulls triton and apache-tvm-ffi into the install while llguidance needs no other
package. This module is pure (llguidance is imported on first use); compiling against the tokenizer (and every
check that needs it) is grammar_compiler.py's; the mask and the matchers are runner/grammar.py's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from aptserve.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# A JSON schema, regex or grammar longer than this is refused before anything compiles it.
MAX_SPEC_CHARS = 64 * 1024


@dataclass(frozen=True)
class StructuredOutput:
    kind: str
    spec: str = ""  # the schema / regex / grammar text; for choice, a JSON list of strings

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(f"the structured output {self.kind} is longer than {MAX_SPEC_CHARS} "
                                      "characters")

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(choices))

    def grammar(self) -> str:
        """The llguidance grammar text (checked against the tokenizer only when compiled: grammar_compiler.py)."""
        from llguidance import LLMatcher

        if self.kind == "json":
            try:
                return LLMatcher.grammar_from_json_schema(self.spec)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from exc
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}')
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":  # JSON string literals are Lark string literals
            # One lexeme (a terminal), not one rule per option: the lexer matches thousands of literals in one
            # state, where the parser would hold an item per option and stop past its 2,000 items per row.
            options = " | ".join(json.dumps(c) for c in json.loads(self.spec))
            return LLMatcher.grammar_from_lark(f"start: CHOICE\nCHOICE: {options}")
        return LLMatcher.grammar_from_lark(self.spec)
