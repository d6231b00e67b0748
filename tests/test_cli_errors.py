"""Every subcommand, given missing or wrong flags, ends with one `error: ...` line and exit status 2, never a
traceback, and before it starts anything expensive (an engine-core process, a simulation)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aptserve.cli import main

SLOS = ["--ttft-slo", "1", "--tbt-slo", "1"]
BAD_FLAGS = [
    ([], "required: command"),
    (["nope"], "invalid choice"),
    (["serve", "--max-num-seqs", "abc"], "invalid int value"),
    (["serve", "--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
    (["serve", "--scheduler", "nope"], "invalid choice"),
    (["serve", "--kv-cache-memory", "lots"], "not a byte size"),
    (["serve", "--port", "70000"], "port must be in [0, 65535]"),
    (["serve", "--max-queue-len", "0"], "max_queue_len must be >= 1"),
    (["serve", "--model", "/no/such/model"], "unknown model"),
    (["generate", "--model", "/no/such/model", "--prompt", "x"], "unknown model"),
    (["generate", "--max-tokens", "x"], "invalid int value"),
    (["bench"], "required: bench_command"),
    (["bench", "run"], "required: --base-url"),
    (["bench", "run", "--base-url", "http://127.0.0.1:9", "--rate", "1"], "--slo-scale"),
    (["bench", "run", "--base-url", "http://127.0.0.1:9", "--rate", "-1", *SLOS], "--rate must be > 0"),
    (["bench", "compare", "--base-url", "nourl"], "expected NAME=URL"),
    (["sim"], "--rate"),
    (["sim", "--gpu", "nope"], "invalid choice"),
    (["sim", "--rate", "1", *SLOS, "--cost-model", "/no/such/profile.json"], "No such file"),
    (["sim", "--rate", "1", *SLOS, "--policies", "fcfs,nope"], "nope"),
    (["sim", "--model", "nope", "--rate", "1", *SLOS], "unknown model"),
    (["profile", "--from-step-log", "/no/such/steps.jsonl"], "No such file"),
    (["profile", "--model", "/no/such/model"], "unknown model"),
]


@pytest.mark.parametrize("argv,expected", BAD_FLAGS, ids=lambda value: " ".join(value) if isinstance(value, list)
                         else None)
def test_bad_flags_end_in_one_error_line_and_exit_status_2(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a subcommand writes lands in the repository
    assert expected in bad_flags_error(argv, capsys)


def bad_flags_error(argv: list[str], capsys) -> str:
    """The one `error: ...` line `aptserve <argv>` ends with, having checked its exit status 2 and no traceback."""
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert status == 2, err
    assert "Traceback" not in err and "error: " in last, err
    return last


def test_the_installed_command_reports_a_trace_that_cannot_fit_instead_of_an_index_error(tmp_path):
    """The issue's case: LongBench's 4,096-token prompts against a 2,048-token model, no --target-prompt-len."""
    result = subprocess.run([sys.executable, "-m", "aptserve.cli", "sim", "--model", "opt-13b", "--dataset",
                             "longbench", "--num-requests", "4", "--rate", "1", *SLOS, "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no prompt of the trace fits")
    assert "--target-prompt-len" in result.stderr
