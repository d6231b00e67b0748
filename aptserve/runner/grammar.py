"""The runner's side of structured output: one llguidance matcher per constrained request, each step's token masks
computed for all of them at once (llguidance's executor, in parallel native threads) and applied to the logits in
one batched op; the matchers advance by the sampled tokens.

A matcher lives as long as its request (dropped with the sampler's generators when it finishes), so preemption and
recompute keep its position: the tokens it has consumed are never sampled again. Each is a copy of a grammar the
GrammarCompiler (built at start-up with the tokenizer) compiled off the step: the engine core hands it in with
`add` before the request reaches the scheduler (core/grammar_gate.py), so a step never compiles.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from aptserve.grammar_compiler import GrammarCompiler
from aptserve.sched.output import ScheduledRequest

BITS = 32


class GrammarBank:
    def __init__(self, compiler: GrammarCompiler | None, vocab_size: int) -> None:
        """`compiler`: None for a model without a tokenizer (no structured output)."""
        self.compiler, self.vocab_size = compiler, vocab_size
        self._executor = None
        if compiler is not None:  # its native threads start here, not in a step
            import llguidance

            self._executor = llguidance.LLExecutor()
        self._matchers: dict[str, object] = {}

    def add(self, request_id: str, compiled) -> None:
        """Give a request its own matcher, a copy of its compiled grammar (GrammarCompiler.compile)."""
        self._matchers[request_id] = compiled.deep_copy()

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def mask(self, logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> list[int]:
        """Set to -inf, in place, every token that cannot continue a constrained row's text; returns those rows."""
        constrained = [i for i, r in enumerate(rows) if r.sampling_params.structured is not None]
        if not constrained:
            return []
        # llguidance.numpy, not llguidance.torch: the latter's import runs torch.compile (seconds of every start-up).
        import llguidance.numpy

        matchers = [(self._matcher(rows[i]), slot) for slot, i in enumerate(constrained)]
        words = np.empty((len(constrained), -(-self.vocab_size // BITS)), dtype=np.int32)
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, words)
        bitmask = torch.from_numpy(words)
        allowed = (bitmask[:, :, None] >> torch.arange(BITS, dtype=torch.int32)) & 1
        allowed = allowed.view(len(constrained), -1)[:, :logits.shape[1]].to(logits.device)
        logits[constrained] = logits[constrained].masked_fill(allowed == 0, float("-inf"))
        return constrained

    def advance(self, rows: Sequence[ScheduledRequest], token_ids: list[int], constrained: list[int]) -> dict[str, str]:
        """Feed each constrained row its sampled token; returns the rows whose matcher refused it (request id ->
        why), which cannot go on."""
        failed = {}
        for i in constrained:
            matcher = self._matchers[rows[i].request_id]
            if not matcher.consume_token(token_ids[i]) or matcher.is_error():
                failed[rows[i].request_id] = f"structured output failed: {matcher.get_error()}"
        return failed

    def _matcher(self, row: ScheduledRequest):
        matcher = self._matchers.get(row.request_id)
        if matcher is None:  # a core without a grammar gate (a bare runner): compile here
            if self.compiler is None:
                raise ValueError("structured output needs the model's tokenizer")
            matcher = self._matchers[row.request_id] = self.compiler.matcher(row.sampling_params.structured)
        return matcher
