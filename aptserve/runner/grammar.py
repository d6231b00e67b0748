"""The runner's side of structured output: one llguidance matcher per constrained request, each step's token masks
computed for all of them at once (llguidance's executor, in parallel native threads) and applied to the logits in
one batched op; the matchers advance by the sampled tokens.

A matcher lives as long as its request (dropped with the sampler's generators when it finishes), so preemption and
recompute keep its position: the tokens it has consumed are never sampled again. The tokenizer view llguidance
needs is built on the first constrained request (about a second), not at start-up.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from aptserve.sched.output import ScheduledRequest

BITS = 32


class GrammarBank:
    def __init__(self, tokenizer_path: str | None, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer_path, self.vocab_size, self.eos_token_ids = tokenizer_path, vocab_size, tuple(eos_token_ids)
        self._tokenizer = None
        self._executor = None
        self._matchers: dict[str, object] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def mask(self, logits: torch.Tensor, rows: Sequence[ScheduledRequest]) -> list[int]:
        """Set to -inf, in place, every token that cannot continue a constrained row's text; returns those rows."""
        constrained = [i for i, r in enumerate(rows) if r.sampling_params.structured is not None]
        if not constrained:
            return []
        import llguidance.torch

        matchers = [(self._matcher(rows[i]), slot) for slot, i in enumerate(constrained)]
        bitmask = torch.empty(len(constrained), -(-self.vocab_size // BITS), dtype=torch.int32)
        llguidance.torch.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
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
        if matcher is None:
            import llguidance

            if self._tokenizer is None:
                import llguidance.hf

                from aptserve.registry import load_tokenizer

                if self.tokenizer_path is None:
                    raise ValueError("structured output needs the model's tokenizer")
                self._tokenizer = llguidance.hf.from_tokenizer(load_tokenizer(self.tokenizer_path),
                                                               n_vocab=self.vocab_size,
                                                               eos_token=list(self.eos_token_ids) or None)
                self._executor = llguidance.LLExecutor()
            matcher = llguidance.LLMatcher(self._tokenizer, row.sampling_params.structured.grammar())
            if matcher.is_error():
                raise ValueError(f"structured output does not compile: {matcher.get_error()}")
            self._matchers[row.request_id] = matcher
        return matcher
