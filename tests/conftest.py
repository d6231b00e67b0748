"""The suite's engines compute in float32 on every machine: `--dtype auto` would pick bf16 on a CPU with native bf16
and float32 elsewhere, and the HF parity tests compare tokens exactly in fp32. Tests of bf16 and of the auto choice
ask for them explicitly (tests/test_dtype.py). Servers the tests start as processes keep the real default."""
from __future__ import annotations

import pytest

from aptserve import hardware


@pytest.fixture(autouse=True)
def _float32_where_dtype_is_auto(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_computes_bf16", lambda: False)
