"""Per-step attention metadata, built once for all layers and vectorised over tokens.

Requests come ordered KV decodes, hidden decodes (each by context length), then prefill chunks.
Slots are flat indices (unit * block_size + row) into a cache viewed as [units * block_size, kv_dim].
Hidden requests that attend over cached context (decodes, chunks after position 0) are packed, in
order, into recompute groups whose context blocks fit the scratch; a request's context is at most
max_model_len tokens, so a scratch of ceil(max_model_len / block_size) blocks always holds one.
The scratch is one layer's K/V, laid out like the cache (two units per block), in pool units the step lends it
(SchedulerOutput.scratch_unit_ids): a pool unit spans every layer, so each lent unit holds num_layers one-layer
units of the scratch, addressed in the cache viewed as [num_layers * num_units, block_size, kv_dim].
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby

import torch

from aptserve.cache.geometry import KV_UNITS_PER_BLOCK, cdiv, hidden_units_per_block
from aptserve.cache.tables import CacheKind
from aptserve.model.attention_metadata import AttentionMetadata, DecodeGroup, PrefillChunk, RecomputeGroup
from aptserve.model.hidden import HiddenProjection, KVInversion
from aptserve.sched.output import CacheConversion, ScheduledRequest
# The model's positional tables for absolute positions (RoPE cos/sin), or None (OPT).
RopeFn = Callable[[torch.Tensor], object]


def unit_slots(tables, req_of_row, positions, block_size: int, units_per_block: int, unit_in_block: int):
    """Flat (unit * block_size + row) slots of each row in unit `unit_in_block` of its block."""
    units = tables[req_of_row, positions // block_size * units_per_block + unit_in_block]
    return units * block_size + positions % block_size


def kv_slots(tables, req_of_row, positions, block_size: int) -> torch.Tensor:
    """[2, rows]: the K slots of the rows, and their V slots."""
    return torch.stack([unit_slots(tables, req_of_row, positions, block_size, KV_UNITS_PER_BLOCK, unit)
                        for unit in range(KV_UNITS_PER_BLOCK)])


def hidden_slots(tables, req_of_row, positions, block_size: int, units_per_block: int) -> torch.Tensor:
    """The u slots of each row, row-major (hidden.py's layout)."""
    slots = [unit_slots(tables, req_of_row, positions, block_size, units_per_block, unit)
             for unit in range(units_per_block)]
    return torch.stack(slots, dim=1).reshape(-1)


def padded_tables(unit_ids: Sequence[list[int]]) -> torch.Tensor:
    max_units = max(len(units) for units in unit_ids)
    return torch.tensor([units + [0] * (max_units - len(units)) for units in unit_ids], dtype=torch.long)


def rows_of(counts: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For requests with counts[i] rows from position starts[i]: each row's request, each row's
    absolute position, and each request's first row."""
    req_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first_row = torch.cumsum(counts, 0) - counts
    positions = starts[req_of_row] + torch.arange(int(counts.sum())) - first_row[req_of_row]
    return req_of_row, positions, first_row


def pack(sizes: list[int], capacity: int, what: str) -> list[list[int]]:
    """Consecutive indices of `sizes` in groups whose sum is at most `capacity`."""
    groups: list[list[int]] = []
    used = capacity
    for i, size in enumerate(sizes):
        if size > capacity:
            raise ValueError(f"{what}: one request needs {size} but the scratch holds {capacity}; raise "
                             "hidden_scratch_tokens to at least max_model_len (rounded up to a block)")
        if used + size > capacity:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def order_for_step(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
    """KV decodes, hidden decodes (similar context lengths side by side keep padding small), prefills."""
    decodes = sorted((r for r in scheduled if r.num_tokens == 1), key=lambda r: r.start_pos)
    return ([r for r in decodes if r.cache_kind == CacheKind.KV]
            + [r for r in decodes if r.cache_kind == CacheKind.HIDDEN]
            + [r for r in scheduled if r.num_tokens > 1])


class AttentionMetadataBuilder:
    """Builds each step's AttentionMetadata and conversion plan for one cache and scratch."""

    def __init__(self, kv_cache: torch.Tensor, num_scratch_blocks: int, hidden_size: int,
                 rope_fn: RopeFn, compute_dtype: torch.dtype | None = None, paged_kernel: bool = False) -> None:
        """`num_scratch_blocks`: blocks of one layer's K/V the scratch holds; `compute_dtype`: the model's (None:
        the cache's); `paged_kernel`: decodes attend with the kernel that reads K/V in place (model/cpu_kernels.py)."""
        self.paged_kernel = paged_kernel
        self.compute_dtype = compute_dtype or kv_cache.dtype
        self.kv_cache, self.rope_fn = kv_cache, rope_fn
        self.device, self.block_size, self.kv_dim = kv_cache.device, kv_cache.shape[2], kv_cache.shape[3]
        self.hidden_size = hidden_size
        self.units_per_hidden_block = hidden_units_per_block(hidden_size, self.kv_dim)
        self.num_scratch_blocks = num_scratch_blocks
        # Every layer's units side by side: where the scratch's one-layer units live.
        self.scratch = kv_cache.view(-1, self.block_size, self.kv_dim)
        self._scratch_map: tuple[tuple[int, ...], torch.Tensor] = ((), torch.empty(0, dtype=torch.long))

    def build(self, requests: list[ScheduledRequest], cap: int,
              scratch_unit_ids: Sequence[int] = ()) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata and token positions for requests in `order_for_step` order; `cap`: bytes of one
        decode group's K/V gather; `scratch_unit_ids`: the pool units lent to the scratch this step."""
        tables = padded_tables([r.unit_ids for r in requests])
        req_of_row, positions, first_row = rows_of(torch.tensor([r.num_tokens for r in requests]),
                                                   torch.tensor([r.start_pos for r in requests]))
        is_hidden = [r.cache_kind == CacheKind.HIDDEN for r in requests]
        # A hidden prefill from position 0 attends on its fresh K/V, as a KV one does; every other
        # hidden request attends over context K/V recomputed from its stored rows.
        needs_recompute = [hidden and (r.start_pos > 0 or r.num_tokens == 1)
                           for r, hidden in zip(requests, is_hidden)]
        recompute = [i for i, needs in enumerate(needs_recompute) if needs]
        on_pages = [i for i, needs in enumerate(needs_recompute) if not needs]
        decodes = [i for i in on_pages if requests[i].num_tokens == 1]  # the first rows
        decode_groups = self._decode_groups(self.kv_cache, tables[decodes],
                                            [requests[i].context_len for i in decodes], 0, cap)
        prefills = [self._prefill_chunk(int(first_row[i]), requests[i], tables[i])
                    for i in on_pages if requests[i].num_tokens > 1]
        sizes = [self._num_blocks(requests[i].context_len) for i in recompute]
        scratch_map = self._scratch_units(scratch_unit_ids) if recompute else None
        recompute_groups = [
            self._recompute_group(requests, [recompute[j] for j in group], tables, first_row, cap, scratch_map)
            for group in pack(sizes, self.num_scratch_blocks, "hidden K/V recompute")
        ]
        all_groups = decode_groups + [g for group in recompute_groups for g in group.decode_groups]
        gather_units = max([len(group.block_ids) for group in all_groups if group.block_ids is not None], default=0)
        row_writes = self._row_writes(tables, req_of_row, positions, torch.tensor(is_hidden))
        metadata = AttentionMetadata(
            kv_cache=self.kv_cache, **row_writes,
            decode_groups=decode_groups, prefills=prefills, recompute_groups=recompute_groups,
            scratch=self.scratch,
            gather_buffer=self.kv_cache.new_empty(gather_units, self.block_size * self.kv_dim),
        )
        return metadata, positions.to(self.device)

    def build_conversions(self, conversions: list[CacheConversion]) -> list[HiddenProjection | KVInversion]:
        """A step's conversions in the scheduler's order: runs of HIDDEN -> KV projections and of KV -> HIDDEN
        inversions, each run grouped within the scratch's token count (it bounds the temporaries)."""
        directions = {(CacheKind.HIDDEN, CacheKind.KV): self._projection,
                      (CacheKind.KV, CacheKind.HIDDEN): self._inversion}
        built = []
        for (src, dst), run in groupby([c for c in conversions if c.num_tokens > 0],
                                       key=lambda c: (c.src_kind, c.dst_kind)):
            if (src, dst) not in directions:
                raise NotImplementedError(f"no {src.value} -> {dst.value} conversion in place")
            run = list(run)
            groups = pack([c.num_tokens for c in run], self.num_scratch_blocks * self.block_size,
                          f"{src.value} -> {dst.value} conversion")
            built += [directions[src, dst]([run[i] for i in group]) for group in groups]
        return built

    # --- pieces ------------------------------------------------------------------------------
    def _num_blocks(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _hidden_slots(self, tables, req_of_row, positions) -> torch.Tensor:
        slots = hidden_slots(tables, req_of_row, positions, self.block_size, self.units_per_hidden_block)
        return slots.to(self.device)

    def _kv_slots(self, tables, req_of_row, positions) -> torch.Tensor:
        return kv_slots(tables, req_of_row, positions, self.block_size).to(self.device)

    def _row_writes(self, tables, req_of_row, positions, is_hidden) -> dict:
        """Where this step's rows go: K/V of KV requests, x of hidden requests."""
        row_is_hidden = is_hidden[req_of_row]
        kv_rows, hidden_rows = (~row_is_hidden).nonzero().squeeze(1), row_is_hidden.nonzero().squeeze(1)
        if len(hidden_rows) == 0:
            return dict(kv_token_rows=None, slot_mapping=self._kv_slots(tables, req_of_row, positions),
                        hidden_token_rows=None, hidden_slot_mapping=None)
        return dict(
            kv_token_rows=kv_rows.to(self.device),
            slot_mapping=self._kv_slots(tables, req_of_row[kv_rows], positions[kv_rows]),
            hidden_token_rows=hidden_rows.to(self.device),
            hidden_slot_mapping=self._hidden_slots(tables, req_of_row[hidden_rows], positions[hidden_rows]),
        )

    def _scratch_units(self, scratch_unit_ids: Sequence[int]) -> torch.Tensor:
        """The flat unit (layer * num_units + unit) of each one-layer unit of the scratch: the lent units' layer 0
        slices first, then their layer 1 slices, and so on (built again only when the lent units change)."""
        scratch_unit_ids = tuple(scratch_unit_ids)
        if scratch_unit_ids != self._scratch_map[0]:
            num_layers, num_units = self.kv_cache.shape[:2]
            need = KV_UNITS_PER_BLOCK * self.num_scratch_blocks
            if len(scratch_unit_ids) * num_layers < need:
                raise ValueError(f"hidden requests attend over recomputed K/V, but the step lends the scratch "
                                 f"{len(scratch_unit_ids)} pool units of the {cdiv(need, num_layers)} it needs")
            index = torch.arange(need)
            lent = torch.tensor(scratch_unit_ids, dtype=torch.long)
            self._scratch_map = (scratch_unit_ids, index // len(lent) * num_units + lent[index % len(lent)])
        return self._scratch_map[1]

    def _recompute_group(self, requests, indices: list[int], tables, first_row, cap: int,
                         scratch_map: torch.Tensor) -> RecomputeGroup:
        """Context K/V (positions [0, context_len)) of these hidden requests, recomputed into the scratch."""
        context_lens = torch.tensor([requests[i].context_len for i in indices])
        req_of_row, positions, _ = rows_of(context_lens, torch.zeros_like(context_lens))
        scratch_tables = scratch_map[self._scratch_tables(context_lens)]
        projection = HiddenProjection(
            hidden_slots=self._hidden_slots(tables[indices], req_of_row, positions),
            hidden_size=self.hidden_size, rope=self.rope_fn(positions.to(self.device)),
            dst_slots=self._kv_slots(scratch_tables, req_of_row, positions), compute_dtype=self.compute_dtype,
        )
        decodes = [j for j, i in enumerate(indices) if requests[i].num_tokens == 1]  # consecutive rows
        row_offset = int(first_row[indices[decodes[0]]]) if decodes else 0
        decode_groups = self._decode_groups(self.scratch, scratch_tables[decodes],
                                            context_lens[decodes].tolist(), row_offset, cap)
        prefills = [self._prefill_chunk(int(first_row[i]), requests[i], scratch_tables[j])
                    for j, i in enumerate(indices) if requests[i].num_tokens > 1]
        return RecomputeGroup(projection, decode_groups, prefills)

    def _scratch_tables(self, context_lens: torch.Tensor) -> torch.Tensor:
        """KV-layout tables over the scratch's own units: each request's blocks side by side (padding -> unit 0)."""
        num_blocks = (context_lens + self.block_size - 1) // self.block_size
        first_block = torch.cumsum(num_blocks, 0) - num_blocks
        block = torch.arange(int(num_blocks.max()))
        k_units = KV_UNITS_PER_BLOCK * (first_block[:, None] + block)
        k_units = torch.where(block < num_blocks[:, None], k_units, 0)
        return torch.stack([k_units, k_units + 1], dim=2).reshape(len(context_lens), -1)

    def _conversion_rows(self, conversions: list[CacheConversion]):
        """Each converted row's request and position, the source tables and the destination tables."""
        counts = torch.tensor([c.num_tokens for c in conversions])
        req_of_row, positions, _ = rows_of(counts, torch.zeros_like(counts))
        return (req_of_row, positions, padded_tables([c.src_unit_ids for c in conversions]),
                padded_tables([c.dst_unit_ids for c in conversions]))

    def _projection(self, conversions: list[CacheConversion]) -> HiddenProjection:
        req_of_row, positions, src_tables, dst_tables = self._conversion_rows(conversions)
        return HiddenProjection(
            hidden_slots=self._hidden_slots(src_tables, req_of_row, positions),
            hidden_size=self.hidden_size, rope=self.rope_fn(positions.to(self.device)),
            dst_slots=self._kv_slots(dst_tables, req_of_row, positions), compute_dtype=self.compute_dtype,
        )

    def _inversion(self, conversions: list[CacheConversion]) -> KVInversion:
        req_of_row, positions, src_tables, dst_tables = self._conversion_rows(conversions)
        return KVInversion(
            kv_slots=self._kv_slots(src_tables, req_of_row, positions),
            rope=self.rope_fn(positions.to(self.device)),
            dst_slots=self._hidden_slots(dst_tables, req_of_row, positions), compute_dtype=self.compute_dtype,
        )

    def _decode_groups(self, cache, tables, context_lens: list[int], row_offset: int,
                       cap: int) -> list[DecodeGroup]:
        """Decodes on consecutive rows from `row_offset`, split so that each group's padded K/V gather
        stays within `cap` bytes."""
        block_bytes = KV_UNITS_PER_BLOCK * self.block_size * self.kv_dim * cache.element_size()
        groups, start, max_len = [], 0, 0
        for i, context_len in enumerate(context_lens):
            max_len = max(max_len, context_len)
            if i > start and (i + 1 - start) * self._num_blocks(max_len) * block_bytes > cap:
                groups.append(self._decode_group(tables[start:i], context_lens[start:i], row_offset + start))
                start, max_len = i, context_len
        if start < len(context_lens):
            groups.append(self._decode_group(tables[start:], context_lens[start:], row_offset + start))
        return groups

    def _decode_group(self, tables, context_lens: list[int], token_start: int) -> DecodeGroup:
        num_decodes, max_blocks = len(context_lens), self._num_blocks(max(context_lens))
        block_ids = tables[:, : max_blocks * KV_UNITS_PER_BLOCK].reshape(num_decodes, max_blocks, KV_UNITS_PER_BLOCK)
        if self.paged_kernel:
            return DecodeGroup(token_start, token_start + num_decodes, k_units=block_ids[:, :, 0].contiguous(),
                               v_units=block_ids[:, :, 1].contiguous(), context_lens=torch.tensor(context_lens))
        valid = torch.arange(max_blocks * self.block_size) < torch.tensor(context_lens)[:, None]
        mask = torch.zeros(valid.shape, dtype=self.compute_dtype).masked_fill_(~valid, float("-inf"))
        return DecodeGroup(
            token_start, token_start + num_decodes,
            block_ids=block_ids.permute(2, 0, 1).reshape(-1).to(self.device),
            mask=mask.view(num_decodes, 1, 1, -1).to(self.device),
        )

    def _prefill_chunk(self, token_start: int, request: ScheduledRequest, table) -> PrefillChunk:
        """A chunk after cached rows reads its context through `table` (KV layout); one from 0 does not."""
        block_ids = mask = None
        if request.start_pos > 0:
            context_len = request.context_len
            num_blocks = self._num_blocks(context_len)
            block_ids = table[: num_blocks * KV_UNITS_PER_BLOCK].view(num_blocks, KV_UNITS_PER_BLOCK).T.reshape(-1)
            query_pos = torch.arange(request.start_pos, context_len)
            mask = (torch.arange(context_len)[None, :] <= query_pos[:, None]).to(self.device)
            block_ids = block_ids.to(self.device)
        return PrefillChunk(token_start, token_start + request.num_tokens, block_ids, mask)
