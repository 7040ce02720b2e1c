"""The `vpt-fast` command end to end on a tiny model (the main job's code path, not its timing)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test runs the command in a fresh process

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--prompts", "4"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpt_fast", *args], capture_output=True, text=True, check=True)


def test_bench_prints_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("bench", *TINY, "--batch", "2", "--steps", "1", "--backends", "torch", "--json", str(out))
    assert "[time] training steps" in proc.stderr  # progress output
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["method", "train", "img/s"]
    assert [line.split()[0] for line in lines[2:]] == ["eager", "vpt_fast[torch]"]
    rows = json.loads(out.read_text())["rows"]
    torch_row = rows[1]
    assert torch_row["max_logit_diff"] < 1e-4
    assert torch_row["train_gflops"] < rows[0]["train_gflops"]
    # Measured, but not compared: at this size the resident memory is allocator noise
    # (tests/test_efficiency.py compares it at ViT-S/16).
    assert all(isinstance(row["activation_bytes"], int) for row in rows)


def test_memory_plot(tmp_path):
    png = tmp_path / "memory.png"
    proc = _run("memory", *TINY, "--batches", "2", "--plot", str(png))
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert len(proc.stdout.strip().splitlines()) == 3  # header, one batch row, "wrote ..."


@pytest.mark.parametrize("module", ["vpt_fast", "vpt_fast.cli"])
def test_module_entry_points_run_the_cli(module):
    """`python -m vpt_fast` and `python -m vpt_fast.cli` both run the command (the second used to exit
    silently)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("usage: vpt-fast")


def test_memory_options_that_need_total_are_refused_without_it():
    done = subprocess.run([sys.executable, "-m", "vpt_fast", "memory", "--methods", "full"], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "--methods go with --total" in done.stderr
