"""`n` choices of one API request: n engine requests over the same prompt (their prompt blocks shared through the
prefix cache where the pool holds them), read as one stream of (choice index, output).

A seeded request's choice i draws with seed + i, so the choices differ and the answer is reproducible.
Prompt log probabilities (echo) are the model's distribution over the one prompt, the same for every choice: choice 0
alone scores the prompt and the others are given its scores, so n choices cost one scoring, not n (each scoring is a
[prompt, vocabulary] logits pass inside an engine step that other requests wait on).
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

from aptserve.outputs import RequestOutput
from aptserve.sampling import SEED_RANGE, SamplingParams

AddOne = Callable[[str, SamplingParams], Awaitable]  # (request id, params) -> the engine's stream


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    if params.seed is None or index == 0:
        return params
    seed = params.seed + index if params.seed + index <= SEED_RANGE[1] else params.seed - index
    return dataclasses.replace(params, seed=seed)


class ChoiceStreams:
    def __init__(self, streams: list, share_prompt_logprobs: bool = False) -> None:
        self.streams = streams
        self.share_prompt_logprobs = share_prompt_logprobs  # choice 0's prompt logprobs go to every choice

    @classmethod
    async def add(cls, add_one: AddOne, request_id: str, params: SamplingParams, n: int) -> ChoiceStreams:
        """Queue the n requests (ids `request_id` for one choice, else `request_id-i`); if one is refused, the
        ones queued before it are aborted and the refusal is raised."""
        streams, share = [], n > 1 and params.prompt_logprobs is not None
        try:
            for index in range(n):
                child_id = request_id if n == 1 else f"{request_id}-{index}"
                child_params = choice_params(params, index)
                if share and index > 0:
                    child_params = dataclasses.replace(child_params, prompt_logprobs=None)
                streams.append(await add_one(child_id, child_params))
        except BaseException:
            cls(streams).close()
            raise
        return cls(streams, share)

    def close(self) -> None:
        """Abort every choice that has not finished; safe to call twice."""
        for stream in self.streams:
            stream.close()

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self.streams) == 1:  # no pump tasks for the common case
            async for output in self.streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(self._pump(index, stream, queue)) for index, stream in enumerate(self.streams)]
        # Sharing: the other choices' outputs wait (in order) until choice 0's first one brings the prompt's scores.
        held: list[tuple[int, RequestOutput]] = []
        waiting, shared, seen = self.share_prompt_logprobs, None, set()
        try:
            num_done = 0
            while num_done < len(pumps):
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    num_done += 1
                elif not self.share_prompt_logprobs:
                    yield index, item
                elif waiting and index != 0:
                    held.append((index, item))
                else:
                    if waiting:
                        waiting, shared, held = False, item.prompt_logprobs, [(index, item), *held]
                    else:
                        held = [(index, item)]
                    for index, item in held:
                        yield index, self._with_shared(index, item, shared, seen)
                    held = []
        finally:
            for pump in pumps:
                pump.cancel()

    @staticmethod
    def _with_shared(index: int, output: RequestOutput, shared, seen: set[int]) -> RequestOutput:
        """A choice's first output carries the prompt's scores (a stream's later ones do not)."""
        if index not in seen:
            seen.add(index)
            output.prompt_logprobs = shared
        return output

    @staticmethod
    async def _pump(index: int, stream, queue: asyncio.Queue) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:  # the engine failed this choice: the whole answer fails with it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, None))

    async def final_outputs(self) -> list[RequestOutput]:
        """The last output of every choice, in index order."""
        last: dict[int, RequestOutput] = {}
        async for index, output in self:
            last[index] = output
        return [last[index] for index in range(len(self.streams))]
