"""Peak memory of a whole training step (`vpt-fast memory --total` / `--max-batch`) on ViT-Ti.

Each probe is a fresh process; the models are tiny so the file runs in about a minute.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from vpt_fast.bench import BenchConfig
from vpt_fast.bench.memory import largest_batch, max_batch, methods, parse_bytes, resolve_model_name, step_memory
from vpt_fast.cli import main

TINY_VIT = "vit_tiny_patch16_224"


@pytest.mark.slow
def test_total_orders_the_methods(tmp_path):
    """At 224 px with 50 deep prompts activations are tens of MiB, well above measurement noise."""
    out = tmp_path / "total.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vpt_fast", "memory", "--total", "--model", "vit_t", "--batches", "2",
         "--methods", "full,linear,eager,vpt_fast,vpt_fast_block", "--json", str(out)],
        capture_output=True, text=True, check=True)
    assert "[5/5] vpt_fast[auto] recompute=block, batch 2" in proc.stderr  # progress output
    assert [line.split()[1] for line in proc.stdout.splitlines()[3:]] == [
        "full", "linear", "eager", "vpt_fast[auto]", "vpt_fast[auto]"]
    peak = {key: r["peak_bytes"] for key, r in json.loads(out.read_text())["results"]["2"].items()}
    assert peak["linear"] < peak["vpt_fast_block"] < peak["vpt_fast"] < peak["eager"] < peak["full"]
    result = json.loads(out.read_text())["results"]["2"]["vpt_fast"]
    assert result["ratio_to_full"] == pytest.approx(peak["vpt_fast"] / peak["full"])


@pytest.mark.slow
def test_full_finetuning_peak_counts_gradients_and_optimizer_state():
    """At 32 px activations are negligible, so without AdamW's two moments (or without gradients)
    full fine-tuning would peak near 2x (1x) the parameter bytes above the linear probe."""
    cfg = BenchConfig(model=TINY_VIT, img_size=32, batch=2, num_prompts=4)
    full = step_memory(cfg, methods()["full"])
    linear = step_memory(cfg, methods()["linear"])
    param_bytes = full["trainable_params"] * 4
    assert full["grad_optimizer_bytes"] == pytest.approx(3 * param_bytes, rel=1e-3)  # grads, exp_avg, exp_avg_sq
    assert full["peak_bytes"] > 3 * param_bytes
    assert full["peak_bytes"] - linear["peak_bytes"] > 2.7 * param_bytes
    assert linear["peak_bytes"] < 1.3 * param_bytes


@pytest.mark.slow
def test_max_batch_is_the_last_probe_within_budget():
    """vpt_fast on ViT-Ti 224 px peaks near 41 MiB at batch 1 and 64 MiB at batch 2 (23 MiB per image):
    a 52 MiB budget fits batch 1 only. The search itself is `test_largest_batch_search`."""
    budget = 52 * 2**20
    progress = []
    result = max_batch(BenchConfig(model=TINY_VIT, num_prompts=50), methods()["vpt_fast"], budget,
                       log=progress.append)
    assert result["batch"] == 1 and not result["reached_limit"]
    assert list(result["probes"]) == [1, 8, 2]  # 1 fits, 8 does not; the line through them says 1, so 2
    assert result["peak_bytes"] == result["probes"][1] <= budget < result["probes"][2] < result["probes"][8]
    assert len(progress) == 3 and "batch 2 ->" in progress[2] and "(over budget)" in progress[2]


@pytest.mark.slow
def test_budget_probe_refuses_allocations_far_past_the_budget():
    """ViT-B full fine-tuning needs ~1.4 GB before its first forward: a 1-byte budget stops it."""
    result = step_memory(BenchConfig(model="vit_base_patch16_224", batch=1), methods()["full"], limit_bytes=1)
    assert result["out_of_memory"] is True and "allocate" in result["error"]


def _search(peak, budget, batch_limit=None):
    probes = []

    def peak_of(batch):
        probes.append(batch)
        return peak(batch)

    return largest_batch(peak_of, budget, batch_limit), probes


def _true_largest(peak, budget):
    batch = 0
    while peak(batch + 1) <= budget:
        batch += 1
    return batch


def test_largest_batch_search():
    linear = lambda b: 1000 + 100 * b  # noqa: E731  (a step's peak: fixed part + per-image part)
    assert _search(linear, 2300) == (13, [1, 8, 13, 14])  # the line's guess, then the batch past it
    assert _search(linear, 2300, batch_limit=8) == (8, [1, 8])
    assert _search(linear, 2300, batch_limit=20) == (13, [1, 8, 13, 14])
    assert _search(linear, 10**12, batch_limit=64) == (64, [1, 8, 64])
    assert _search(linear, 500) == (0, [1])
    # curved peaks, and probes that could not run (None) past 1.25x the budget: still exact, few probes
    for peak in (lambda b: 1000 + 3 * b * b, lambda b: 1000 + 3000 * b ** 0.5, lambda b: 5000 + 40 * b ** 1.5):
        for budget in (2000, 10**5, 10**7):
            for refused in (False, True):
                probe = (lambda b, p=peak, B=budget: None if p(b) > 1.25 * B else p(b)) if refused else peak
                batch, probes = _search(probe, budget)
                assert batch == _true_largest(peak, budget) and len(probes) <= 16, (budget, batch, probes)
                assert batch + 1 in probes or batch == 0
    with pytest.raises(ValueError, match="batch_limit"):
        largest_batch(linear, 10, batch_limit=0)


def test_parse_bytes_and_model_aliases():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5gib") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="16GiB"):
        parse_bytes("lots")
    assert resolve_model_name("vit_l") == "vit_large_patch16_224"
    assert resolve_model_name("vit_h") == "vit_huge_patch14_224"
    assert resolve_model_name("swin_b") == "swin_base_patch4_window7_224"
    assert resolve_model_name("deit_small_patch16_224") == "deit_small_patch16_224"


@pytest.mark.parametrize("argv,message", [
    (["--total", "--methods", "full,lora"], "--methods: expected a comma list of full, .*'full,lora'"),
    (["--max-batch"], "--max-batch on the CPU needs --budget"),
    (["--max-batch", "--budget", "lots"], "--budget"),
])
def test_cli_rejects_unknown_methods_and_cpu_max_batch_without_budget(capsys, argv, message):
    """Usage errors: argparse's exit status 2 and one line naming the option."""
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", "--model", "vit_t"] + argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
