"""Incremental detokenization and stop-string matching for one request.

Decoding only the tail (prefix_offset..end) keeps each step O(new tokens); text is released only when it
no longer ends in an incomplete UTF-8 sequence, so multi-byte characters never stream as U+FFFD.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self._token_ids: list[int] = []
        # Start a few prompt tokens back so the first output token decodes with its real left context.
        context = list(prompt_token_ids[-5:])
        self._token_ids.extend(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._max_stop_len = max((len(s) for s in stop), default=0)
        # Characters of `text` already handed out by `take_new_text`.
        self._num_released = 0

    def add_tokens(self, new_token_ids: list[int], match_stop: bool = True) -> str | None:
        """Append tokens; returns the stop string matched (text truncated there), or None. With `match_stop`
        false (min_tokens not reached yet), stop strings are not looked for in the new text."""
        self._token_ids.extend(new_token_ids)
        prefix = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._token_ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # wait for the rest of a multi-byte character
        new_text = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += new_text
        return self._match_stop(search_from) if match_stop else None

    def take_new_text(self, finished: bool) -> str:
        """Text not handed out yet; while running, a tail that a stop string might still cut is held back."""
        end = len(self.text) if finished or not self.stop else releasable_len(self.text, self.stop)
        new_text = self.text[self._num_released:end]
        self._num_released = max(self._num_released, end)
        return new_text

    def _match_stop(self, search_from: int) -> str | None:
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1:
                end = index + len(stop) if self.include_stop_str_in_output else index
                self.text = self.text[:end]
                return stop
        return None

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def releasable_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the prefix of `text` that no stop string can still cut: the longest tail of `text`
    that is a proper prefix of a stop string is held back."""
    for tail_len in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        tail = text[-tail_len:]
        if any(s.startswith(tail) for s in stop):
            return len(text) - tail_len
    return len(text)
