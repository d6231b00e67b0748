"""Hybrid cache in the runner: hidden requests (all, mixed, chunked, converted either way, preempted)
produce the greedy tokens of the KV cache and of HF transformers in fp32; the pool holds twice the
tokens when every request is hidden on an MHA model."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aptserve.cache import CacheKind, CacheManager
from aptserve.cache.geometry import bytes_per_unit, hidden_units_per_block, scratch_units
from aptserve.engine import LLMEngine
from aptserve.engine_args import EngineArgs, resolve
from aptserve.registry import load_model_config, resolve_model
from aptserve.runner import ModelRunner
from aptserve.sampling import SamplingParams
from aptserve.sched.output import CacheConversion
from aptserve.sim.executor import LinearCostModel, SimClock
from tests.model_fixtures import (
    TINY_VOCAB, Driver, DriverRequest, _save, assert_matches_hf_greedy, save_tiny_llama, save_tiny_opt,
)

HIDDEN, KV = CacheKind.HIDDEN, CacheKind.KV
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def save_tiny_llama_padded(path) -> str:
    """GQA with kv_dim 24 against hidden 64: u = 3 units per hidden block, the last one zero-padded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return _save(LlamaForCausalLM, config, path)


TINY_MODELS = {
    "llama-mha": lambda path: save_tiny_llama(path, num_kv_heads=4, tie_word_embeddings=False),
    "llama-gqa": lambda path: save_tiny_llama(path, num_kv_heads=2, tie_word_embeddings=True),
    "llama-gqa-padded": save_tiny_llama_padded,
    "opt-pre-ln": lambda path: save_tiny_opt(path, do_layer_norm_before=True, word_embed_proj_dim=64),
    "opt-post-ln": lambda path: save_tiny_opt(path, do_layer_norm_before=False, word_embed_proj_dim=32),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


# --- the runner on tiny models, driven step by step ---------------------------------------------------
@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = TINY_MODELS[request.param](tmp_path_factory.mktemp(request.param))
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_runner(path: str, max_model_len: int = 48, block_size: int = 4):
    """A scratch of one max_model_len context: a few hidden requests already need several groups."""
    config = load_model_config(path, max_model_len=max_model_len)
    runner = ModelRunner(config, 256, block_size, "float32", "cpu", hidden_scratch_tokens=max_model_len,
                         demote_in_place=True)
    units_per_hidden_block = hidden_units_per_block(config.hidden_size, config.kv_dim)
    return runner, CacheManager(256, block_size, units_per_hidden_block, num_scratch_units=runner.num_scratch_units)


def record_inputs(runner: ModelRunner, monkeypatch) -> list:
    """Every step's ModelInput, as the runner prepares it (the list fills while the run goes on)."""
    seen, prepare = [], runner.prepare_inputs
    monkeypatch.setattr(runner, "prepare_inputs",
                        lambda scheduled, scratch=(): seen.append(prepare(scheduled, scratch)) or seen[-1])
    return seen


def test_mixed_kinds_chunks_and_decodes_match_hf(tiny_model, monkeypatch):
    path, hf_model = tiny_model
    runner, manager = make_runner(path)
    runner.decode_group_bytes = 4096  # a few decodes per attention group
    steps = record_inputs(runner, monkeypatch)
    prompts = random_prompts([5, 17, 1, 9, 23], TINY_VOCAB)
    kinds = [HIDDEN, KV, HIDDEN, HIDDEN, HIDDEN]
    requests = [DriverRequest(f"r{i}", p, max_new_tokens=10, arrival_step=i % 3, cache_kind=kind)
                for i, (p, kind) in enumerate(zip(prompts, kinds))]
    outputs = Driver(runner, manager, chunk_size=8).run(requests)
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, outputs[request.request_id])
    assert manager.num_free_units == manager.num_units
    groups = [step.attn_metadata.recompute_groups for step in steps]
    assert max(map(len, groups)) > 1, "the scratch holds one 48-token context: steps need several groups"
    assert any(group.prefills for step in groups for group in step), "a hidden chunk after cached rows"
    assert any(len(group.decode_groups) > 1 for step in groups for group in step)


def test_conversions_read_before_the_step_reuses_their_units(tiny_model):
    path, hf_model = tiny_model
    runner, manager = make_runner(path)
    prompts = random_prompts([13, 6, 9, 3], TINY_VOCAB, seed=1)
    # d stays hidden, so the scratch stays lent: the units the conversions free are the pool's freest.
    requests = [DriverRequest("a", prompts[0], 8, cache_kind=HIDDEN),
                DriverRequest("b", prompts[1], 8, cache_kind=HIDDEN),
                DriverRequest("c", prompts[2], 8, arrival_step=3),
                DriverRequest("d", prompts[3], 8, cache_kind=HIDDEN)]
    driver = Driver(runner, manager)
    for _ in range(3):
        driver.step(requests)
    conversions = []
    for request in requests[:2]:  # a then b: b's new KV units are a's freed hidden units
        src, dst = manager.convert(request.request_id, KV, request.num_computed)
        conversions.append(CacheConversion(request.request_id, request.num_computed, HIDDEN, src, KV, list(dst)))
        request.cache_kind = KV
    driver.step(requests, conversions)  # b's next block and c's prompt take freed hidden units
    assert set(conversions[1].dst_unit_ids) & set(conversions[0].src_unit_ids)
    allocated_in_step = set(manager.unit_ids("b") + manager.unit_ids("c")) - set(conversions[1].dst_unit_ids)
    assert allocated_in_step & set(conversions[1].src_unit_ids)
    while any(len(r.output) < r.max_new_tokens for r in requests):
        driver.step(requests)
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, request.output)


def test_kv_demoted_to_hidden_rows_in_place_and_restored_matches_hf(tiny_model):
    """KV -> hidden rows by solving K/V back to x (in place: the rows land in units they were read from), then
    hidden -> KV by projection: the K/V rebuilt equal the ones replaced, so the tokens are HF's."""
    path, hf_model = tiny_model
    runner, manager = make_runner(path)
    prompts = random_prompts([13, 6, 21], TINY_VOCAB, seed=4)
    requests = [DriverRequest(f"r{i}", prompt, 10) for i, prompt in enumerate(prompts)]
    driver = Driver(runner, manager)
    for _ in range(3):
        driver.step(requests)
    if manager.units_per_block(HIDDEN) >= manager.units_per_block(KV):  # GQA: K/V do not determine x
        with pytest.raises(RuntimeError, match="only where hidden blocks are smaller"):
            manager.demote("r0", requests[0].num_computed)
        return
    demotions = []
    for request in requests[:2]:
        src, dst = manager.demote(request.request_id, request.num_computed)
        assert set(src) & set(dst)  # in place
        demotions.append(CacheConversion(request.request_id, request.num_computed, KV, src, HIDDEN, dst))
        request.cache_kind = HIDDEN
    driver.step(requests, demotions)  # r0 and r1 decode from their solved hidden rows
    driver.step(requests)
    src, dst = manager.convert("r0", KV, requests[0].num_computed)  # restored by projection
    requests[0].cache_kind = KV
    driver.step(requests, [CacheConversion("r0", requests[0].num_computed, HIDDEN, src, KV, list(dst))])
    while any(len(r.output) < r.max_new_tokens for r in requests):
        driver.step(requests)
    for request, prompt in zip(requests, prompts):
        assert_matches_hf_greedy(hf_model, prompt, request.output)
    manager.check_invariants()


def test_scratch_must_hold_one_context(tmp_path):
    config = load_model_config(save_tiny_llama(tmp_path, 4, False), max_model_len=40)
    with pytest.raises(ValueError, match="at least 48"):
        ModelRunner(config, 8, 16, "float32", "cpu", hidden_scratch_tokens=32)
    runner = ModelRunner(config, 8, 16, "float32", "cpu", hidden_scratch_tokens=100)
    # 96 tokens of one layer's K/V: 12 one-layer units, in pool units of every layer.
    assert runner.hidden_scratch_tokens == 96 and runner.num_scratch_units == -(-12 // config.num_layers)
    assert ModelRunner(config, 8, 16, "float32", "cpu", hidden_scratch_tokens=0).num_scratch_units == 0


# --- the whole engine on opt-125m's shape and an MHA Llama ---------------------------------------------
class RecordingExecutor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.outputs = runner, []

    def execute(self, sched_out):
        self.outputs.append(sched_out)
        return self.runner.execute(sched_out)


class ModelledTime(RecordingExecutor):
    """Real tokens in modelled time: each step takes what the simulator's LinearCostModel says, on the engine's
    clock and in the step times its cost model is fitted on, so the policies decide alike on every machine."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine.executor.runner)
        self.clock, self.cost = SimClock(), LinearCostModel()
        engine.core.clock, engine.executor = self.clock, self

    def execute(self, sched_out):
        out = super().execute(sched_out)
        out.prepare_s, out.forward_s, out.sample_s = 0.0, self.cost.step_time(sched_out), 0.0
        self.clock.advance(out.forward_s)
        return out


MAX_MODEL_LEN = 128


def make_engine(path: str, hybrid_cache: str, num_units: int = 200, policy: str = "fcfs",
                max_num_batched_tokens: int | None = None, block_size: int = 8, **engine_args) -> LLMEngine:
    """An engine whose pool leaves `num_units` units to requests while the scratch is lent its units."""
    model_config = load_model_config(path, max_model_len=MAX_MODEL_LEN)
    num_scratch_units = scratch_units(model_config, MAX_MODEL_LEN, block_size) if hybrid_cache != "off" else 0
    budget = (num_units + num_scratch_units) * bytes_per_unit(model_config, block_size, "float32")
    args = EngineArgs(model=path, dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=block_size,
                      kv_cache_memory=budget, hybrid_cache=hybrid_cache, hidden_scratch_tokens=MAX_MODEL_LEN,
                      scheduler=policy, max_num_batched_tokens=max_num_batched_tokens, **engine_args)
    engine = LLMEngine.from_engine_args(args)
    assert engine.cache.num_units == num_units + num_scratch_units
    engine.executor = RecordingExecutor(engine.executor)
    return engine


def run_engine(engine: LLMEngine, prompts: list[list[int]], actions: dict | None = None,
               params: SamplingParams = GREEDY) -> list[list[int]]:
    """Step to the end; `actions[i](engine)` runs before step i. Returns each prompt's tokens."""
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"r{i}")
    tokens, step = {}, 0
    while engine.has_unfinished_requests():
        if actions and step in actions:
            actions[step](engine)
        tokens.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        engine.scheduler.check_invariants()
        step += 1
    assert engine.cache.num_free_units == engine.cache.num_units
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def convert(request_ids: list[str], kind: CacheKind):
    def action(engine: LLMEngine) -> None:
        for request_id in request_ids:
            engine.convert_request(request_id, kind)
    return action


def scheduled_steps(engine: LLMEngine):
    return [out.scheduled for out in engine.executor.outputs]


@dataclass
class EngineCase:
    path: str
    prompts: list[list[int]]
    hf_tokens: list[list[int]]
    kv_tokens: list[list[int]]  # the KV-only engine's


def hf_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    """HF `generate` tokens; it may stop early at an EOS where the engine (ignore_eos) goes on."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist() for p in prompts]


def save_engine_llama(path) -> str:
    """The tiny MHA Llama plus a tokenizer, which the engine loads (prompts here are token ids)."""
    from aptserve.registry import load_tokenizer

    save_tiny_llama(path, num_kv_heads=4, tie_word_embeddings=False)
    load_tokenizer(resolve_model("default")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["opt-125m", "llama-mha"])
def engine_case(request, tmp_path_factory) -> EngineCase:
    if request.param == "opt-125m":
        path = resolve_model("opt-125m")
    else:
        path = save_engine_llama(tmp_path_factory.mktemp("engine-llama"))
    prompts = random_prompts([7, 19, 33, 12], load_model_config(path).vocab_size, seed=2)
    return EngineCase(path, prompts, hf_greedy(path, prompts), run_engine(make_engine(path, "off"), prompts))


def test_kv_only_engine_matches_hf(engine_case):
    for tokens, reference in zip(engine_case.kv_tokens, engine_case.hf_tokens):
        assert len(tokens) == MAX_TOKENS and tokens[: len(reference)] == reference


def test_all_hidden_matches_kv(engine_case):
    engine = make_engine(engine_case.path, "all-hidden")
    assert run_engine(engine, engine_case.prompts) == engine_case.kv_tokens
    kinds = {r.cache_kind for step in scheduled_steps(engine) for r in step}
    assert kinds == {HIDDEN}
    assert any(len(step) == 4 and all(r.num_tokens == 1 for r in step) for step in scheduled_steps(engine))


def test_mixed_batch_matches_kv(engine_case):
    engine = make_engine(engine_case.path, "on")
    tokens = run_engine(engine, engine_case.prompts, {0: convert(["r0", "r2"], HIDDEN)})
    assert tokens == engine_case.kv_tokens
    kinds = [[r.cache_kind for r in sorted(step, key=lambda r: r.request_id)] for step in scheduled_steps(engine)]
    assert [HIDDEN, KV, HIDDEN, KV] in kinds


def test_hidden_to_kv_in_place_mid_decode_matches_kv(engine_case):
    engine = make_engine(engine_case.path, "on")
    actions = {0: convert(["r0", "r1", "r2"], HIDDEN), 4: convert(["r0", "r2"], KV)}
    assert run_engine(engine, engine_case.prompts, actions) == engine_case.kv_tokens
    conversions = [out.conversions for out in engine.executor.outputs if out.conversions]
    assert [[c.request_id for c in step] for step in conversions] == [["r0", "r2"]]
    assert engine.scheduler.num_preemptions == 0
    last_kinds = {r.request_id: r.cache_kind for r in scheduled_steps(engine)[-1]}
    assert last_kinds["r0"] == KV and last_kinds["r1"] == HIDDEN


def test_kv_to_hidden_in_place_mid_decode_matches_kv(engine_case):
    """On MHA, K/V determine the hidden rows: with demotion on they are solved back in place (RoPE undone for
    Llama), no re-prefill; without it the model keeps no left inverse and the requests prefill again as hidden."""
    recompute = make_engine(engine_case.path, "on")
    actions = {4: convert(["r1", "r3"], HIDDEN)}
    assert run_engine(recompute, engine_case.prompts, actions) == engine_case.kv_tokens
    assert recompute.scheduler.num_preemptions == 2
    assert all(layer.kv_inverse is None and layer.kv_proj is not None
               for layer in recompute.executor.runner.model.attention_layers())
    engine = make_engine(engine_case.path, "on", preemption_mode="hidden")
    assert run_engine(engine, engine_case.prompts, actions) == engine_case.kv_tokens
    conversions = [(i, c) for i, out in enumerate(engine.executor.outputs) for c in out.conversions]
    assert [(c.request_id, c.src_kind, c.dst_kind) for _, c in conversions] == [("r1", KV, HIDDEN), ("r3", KV, HIDDEN)]
    assert engine.scheduler.num_preemptions == 0 and engine.scheduler.num_demotions == 0  # asked for, not forced
    later = [r for step in scheduled_steps(engine)[conversions[0][0]:] for r in step if r.request_id in ("r1", "r3")]
    assert later and all(r.num_tokens == 1 and r.cache_kind == HIDDEN for r in later)


def test_where_memory_runs_out_apt_demotes_kv_to_hidden_rows_if_the_step_time_allows_else_recomputes():
    """Preemption by demotion on OPT-125M's shapes: with the hidden rows' re-projection priced at nothing
    (--alpha 1e-9) the victims keep decoding as hidden rows solved back from their K/V, and the tokens are the
    KV-only engine's; priced at a second a block, no step has time for them and the victims are recomputed."""
    path = resolve_model("opt-125m")
    prompts = random_prompts([7, 19, 33, 12], load_model_config(path).vocab_size, seed=2)
    kv_tokens = run_engine(make_engine(path, "off"), prompts)
    cheap = make_engine(path, "on", 18, "apt-chunked", alpha=1e-9, preemption_mode="hidden")
    ModelledTime(cheap)
    assert run_engine(cheap, prompts) == kv_tokens
    demotions = [c for out in cheap.executor.outputs for c in out.conversions if c.dst_kind == HIDDEN]
    assert cheap.scheduler.num_demotions == len(demotions) > 0
    dear = make_engine(path, "on", 18, "apt-chunked", alpha=1.0, preemption_mode="hidden")
    ModelledTime(dear)
    assert run_engine(dear, prompts) == kv_tokens
    assert dear.scheduler.num_demotions == 0 and dear.scheduler.num_preemptions > 0


def test_preemption_mode_demotes_only_when_asked_and_where_k_v_determine_x():
    def demotes(model: str, **flags) -> bool:
        return resolve(EngineArgs(model=model, alpha=0.01, **flags)).scheduler.demote_in_place

    assert not demotes("opt-125m") and not demotes("default")  # recompute by default: no left inverse kept
    assert demotes("opt-125m", preemption_mode="hidden") and demotes("opt-125m", preemption_mode="hidden",
                                                                     scheduler="fcfs", hybrid_cache="on")
    for model, flags in (("default", {}), ("opt-125m", {"hybrid_cache": "off"}),
                         ("opt-125m", {"hybrid_cache": "all-hidden"})):  # GQA; no KV or no hidden table
        with pytest.raises(ValueError, match="preemption_mode 'hidden' needs"):
            demotes(model, preemption_mode="hidden", **flags)
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        demotes("opt-125m", preemption_mode="auto")


def test_all_hidden_under_a_tight_budget_preempts_and_matches_kv(engine_case):
    engine = make_engine(engine_case.path, "all-hidden", num_units=10)  # the longest request needs 6
    assert run_engine(engine, engine_case.prompts) == engine_case.kv_tokens
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill_of_hidden_requests_matches_kv(engine_case):
    engine = make_engine(engine_case.path, "on", policy="chunked", max_num_batched_tokens=16)
    tokens = run_engine(engine, engine_case.prompts, {0: convert(["r1", "r2"], HIDDEN)})
    assert tokens == engine_case.kv_tokens
    steps = scheduled_steps(engine)
    assert any(r.cache_kind == HIDDEN and r.start_pos > 0 and r.num_tokens > 1 for step in steps for r in step)
    assert any({r.cache_kind for r in step} == {HIDDEN, KV} and any(r.num_tokens == 1 for r in step)
               for step in steps)


# --- capacity -----------------------------------------------------------------------------------------
def test_all_hidden_pool_holds_twice_the_tokens_on_mha(tmp_path):
    path = save_engine_llama(tmp_path)
    prompts = random_prompts([12] * 8, TINY_VOCAB, seed=3)  # 12 + 4 tokens: 2 blocks of 8 each
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    kv_engine, hidden_engine = make_engine(path, "off", num_units=16), make_engine(path, "all-hidden", num_units=16)
    # The same 16 units (besides the scratch's) hold 64 tokens as KV, 128 as hidden rows.
    hidden_units = hidden_engine.cache.num_units - hidden_engine.cache.num_scratch_units
    assert (kv_engine.cache.num_units == hidden_units == kv_engine.cache.num_units_for(KV, 64)
            == hidden_engine.cache.num_units_for(HIDDEN, 128) == 16)
    kv_tokens = run_engine(kv_engine, prompts, params=params)
    assert run_engine(hidden_engine, prompts, params=params) == kv_tokens
    assert len(scheduled_steps(kv_engine)[0]) == 4 and len(scheduled_steps(hidden_engine)[0]) == 8


def test_smollm2_keeps_the_hidden_cache_off_but_is_correct_when_forced():
    path = resolve_model("default")
    engine = make_engine(path, "auto", num_units=60, block_size=16)
    assert engine.hybrid_cache == "off"
    assert engine.cache.units_per_block(HIDDEN) == 3  # r = 1.5: a hidden block is 1.5 KV blocks
    with pytest.raises(ValueError, match="off"):
        engine.convert_request("any", HIDDEN)
    prompts = random_prompts([9, 21], 49152, seed=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kv_tokens = run_engine(engine, prompts, params=params)
    assert run_engine(make_engine(path, "all-hidden", num_units=60, block_size=16), prompts, params=params) == kv_tokens
    forced = make_engine(path, "on", num_units=60, block_size=16)
    assert run_engine(forced, prompts, {2: convert(["r1"], HIDDEN)}, params=params) == kv_tokens
    assert forced.scheduler.num_preemptions == 1  # GQA: K/V do not determine x, so KV -> HIDDEN re-prefills
