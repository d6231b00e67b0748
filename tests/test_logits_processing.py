"""The sampler's logits processing and log probabilities against references written here from the definitions
(OpenAI's for presence / frequency penalties and logit_bias, CTRL's repetition penalty, vLLM's min_p and
min_tokens), one request at a time, while the sampler does a whole batch at once."""
from __future__ import annotations

import math

import pytest
import torch

from aptserve.cache import CacheKind
from aptserve.errors import InvalidRequestError
from aptserve.logprobs import LogprobsMode
from aptserve.runner.logits_processing import apply_constraints, apply_min_p
from aptserve.runner.sampler import Sampler
from aptserve.sampling import SamplingParams
from aptserve.sched.output import ScheduledRequest

VOCAB = 50
EOS = 2


def row(request_id: str, params: SamplingParams, prompt=(), outputs=()) -> ScheduledRequest:
    return ScheduledRequest(request_id, [0], 0, CacheKind.KV, [], True, params, list(prompt), list(outputs))


def reference(logits: list[float], params: SamplingParams, prompt: list[int], outputs: list[int]) -> list[float]:
    """One request's logits after min_tokens, logit_bias and the penalties, token by token."""
    out = list(logits)
    if len(outputs) < params.min_tokens:
        for token in (EOS, *params.stop_token_ids):
            out[token] = -math.inf
    for token, bias in (params.logit_bias or {}).items():
        out[token] += bias
    for token in range(len(out)):
        if token in prompt or token in outputs:
            r = params.repetition_penalty
            out[token] = out[token] / r if out[token] > 0 else out[token] * r
        count = outputs.count(token)
        out[token] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return out


CASES = [
    (SamplingParams(temperature=0), [], []),  # untouched
    (SamplingParams(temperature=0, presence_penalty=1.5), [1, 2, 3], [4, 4, 5]),
    (SamplingParams(temperature=0, frequency_penalty=-0.7), [], [7, 7, 7, 9]),
    (SamplingParams(temperature=0, repetition_penalty=1.8), [10, 11, 12], [12, 13]),
    (SamplingParams(temperature=0, repetition_penalty=0.5, frequency_penalty=0.3, presence_penalty=-1.0),
     [3, 3], [3, 8, 8]),
    (SamplingParams(temperature=0, logit_bias={5: 100.0, 6: -100.0, 40: 2.5}), [], [1]),
    (SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(17,)), [], [1, 1]),  # EOS and 17 banned
    (SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(17,)), [], [1, 1, 1]),  # reached: allowed
]


def test_batched_processing_equals_the_per_request_definitions():
    logits = torch.randn(len(CASES), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    rows = [row(f"r{i}", p, prompt, outputs) for i, (p, prompt, outputs) in enumerate(CASES)]
    original = logits.clone()
    processed = apply_constraints(logits, rows, (EOS,))
    for i, (params, prompt, outputs) in enumerate(CASES):
        expected = torch.tensor(reference(logits[i].tolist(), params, prompt, outputs))
        torch.testing.assert_close(processed[i], expected, rtol=1e-6, atol=1e-6)
    assert torch.isinf(processed[6, EOS]) and torch.isinf(processed[6, 17]) and not torch.isinf(processed[7]).any()
    assert torch.equal(logits, original)  # a copy was processed: a failed batch is re-sampled from the logits


def test_a_rows_tokens_do_not_depend_on_its_batch():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    penalized = SamplingParams(temperature=0.9, seed=5, frequency_penalty=1.0, repetition_penalty=1.3, min_p=0.05)
    alone = Sampler()(logits[:1], [row("a", penalized, [1, 2], [3, 3])])[0]
    batch = Sampler()(logits, [row("a", penalized, [1, 2], [3, 3]), row("b", SamplingParams(temperature=0)),
                             row("c", SamplingParams(presence_penalty=2.0), [], [0])])[0]
    assert batch[0] == alone[0]
    assert batch[1] == int(logits[1].argmax())


def test_min_p_keeps_tokens_within_the_share_of_the_most_likely():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]])
    kept = torch.isfinite(apply_min_p(probs.log(), torch.tensor([0.2])))
    assert kept.tolist() == [[True, True, True, False, False]]  # threshold 0.2 * 0.5 = 0.1


def test_raw_logprobs_are_the_models_and_processed_ones_the_sampled_distribution():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2)) * 2
    params = [SamplingParams(temperature=0, logprobs=5, frequency_penalty=2.0),
              SamplingParams(temperature=0.5, seed=3, logprobs=0)]
    rows = [row("g", params[0], [], [int(logits[0].argmax())]), row("s", params[1])]
    tokens, raw, _ = Sampler()(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    for i, request_id in enumerate(("g", "s")):
        assert raw[request_id].token_id == tokens[i]
        assert raw[request_id].logprob == pytest.approx(float(expected[i, tokens[i]]), rel=1e-5)
        assert raw[request_id].rank == int((expected[i] > expected[i, tokens[i]]).sum()) + 1
    top = expected[0].topk(5)
    assert raw["g"].top_token_ids == top.indices.tolist()
    assert raw["g"].top_logprobs == pytest.approx(top.values.tolist(), rel=1e-5)
    assert raw["s"].top_token_ids == [] and raw["g"].rank > 1  # the penalty moved greedy off the raw argmax

    _, processed, _ = Sampler(logprobs_mode=LogprobsMode.PROCESSED)(logits, rows)
    penalized = apply_constraints(logits, rows, ())
    assert processed["g"].logprob == pytest.approx(float(torch.log_softmax(penalized[0], -1).max()), rel=1e-5)
    assert processed["g"].rank == 1
    tempered = torch.log_softmax(logits[1] / 0.5, -1)
    assert processed["s"].logprob == pytest.approx(float(tempered[tokens[1]]), rel=1e-5)


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {3: 101.0}}, "logit_bias"), ({"logprobs": -1}, "logprobs"),
])
def test_out_of_range_values_are_refused_with_the_field_named(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_top_k_top_p_from_candidates_equals_sorting_the_whole_row():
    from aptserve.runner.logits_processing import _sorted_top_k_top_p, apply_top_k_top_p

    generator = torch.Generator().manual_seed(4)
    # Peaked rows (a trained model's: the nucleus closes among the candidates) and flat ones (it does not).
    logits = torch.cat([torch.randn(6, 5000, generator=generator) * 8, torch.randn(6, 5000, generator=generator)])
    top_k = torch.tensor([0, 5, 50, 300, 1000, 0] * 2)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.8, 1e-9] * 2)
    fast, slow = apply_top_k_top_p(logits, top_k, top_p), _sorted_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(slow))
    torch.testing.assert_close(fast[torch.isfinite(fast)], slow[torch.isfinite(slow)])
