"""The `vpt-fast` command end to end on a tiny model (the main job's code path, not its timing), and
its refusals of bad input: one argparse usage line each, never a traceback."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import vpt_fast.bench
import vpt_fast.bench.core
from vpt_fast import backends
from vpt_fast.cli import main

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--prompts", "4"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vpt_fast", *args], capture_output=True, text=True, check=True)


@pytest.mark.slow  # runs the command in a fresh process
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


@pytest.mark.slow  # runs the command in a fresh process
def test_memory_plot(tmp_path):
    png = tmp_path / "memory.png"
    proc = _run("memory", *TINY, "--batches", "2", "--plot", str(png))
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert len(proc.stdout.strip().splitlines()) == 3  # header, one batch row, "wrote ..."


@pytest.mark.slow  # runs the command in a fresh process
@pytest.mark.parametrize("module", ["vpt_fast", "vpt_fast.cli"])
def test_module_entry_points_run_the_cli(module):
    """`python -m vpt_fast` and `python -m vpt_fast.cli` both run the command (the second used to exit
    silently)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("usage: vpt-fast")


@pytest.mark.slow  # runs the command in a fresh process
def test_memory_options_that_need_total_are_refused_without_it():
    done = subprocess.run([sys.executable, "-m", "vpt_fast", "memory", "--methods", "full"], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "--methods go with --total" in done.stderr


def _usage_error(capsys, argv: list[str]) -> str:
    """Run the command expecting argparse's refusal (exit status 2, no traceback); its error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"vpt-fast {argv[0]}: error: "), err
    return line


@pytest.fixture
def files(tmp_path):
    """{tmp}: a directory, {junk}: a file that is no checkpoint, {ckpt}: a torch.save file."""
    (tmp_path / "junk.pth.tar").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pth.tar")
    return {"tmp": str(tmp_path), "junk": str(tmp_path / "junk.pth.tar"), "ckpt": str(tmp_path / "ckpt.pth.tar")}


@pytest.mark.parametrize("argv,message", [
    ("bench --batch 0", "argument --batch: expected an integer >= 1, got '0'"),
    ("bench --batch -1", "argument --batch: expected an integer >= 1, got '-1'"),
    ("bench --steps 0", "argument --steps: expected an integer >= 1, got '0'"),
    ("bench --prompts 0", "argument --prompts: expected an integer >= 1, got '0'"),
    ("bench --img-size x", "argument --img-size: expected an integer >= 1, got 'x'"),
    ("bench --model vit_smal", "argument --model: unknown model 'vit_smal'; close names: vit_small_patch8_224, "
                               "vit_small_patch16_224, "),
    ("bench --model vit_base_patch16_244", "unknown model 'vit_base_patch16_244'; close names: vit_base_patch16_224"),
    ("bench --model vit-b", "unknown model 'vit-b'; close names: vit_b"),
    ("bench --backends torch,foo", "argument --backends: unknown backend 'foo' in 'torch,foo'; expected a comma "
                                   "list of auto, reference, torch, triton, cuda"),
    ("bench --device gpu", "argument --device: expected cpu, cuda or cuda:<index>, got 'gpu'"),
    ("bench --inference --tasks 0", "argument --tasks: expected a comma list of integers >= 1 such as 1,2,4, got '0'"),
    ("bench --tasks 2", "--tasks 2 goes with --inference"),
    ("bench --inference --backends torch", "--backends, --compile and --recompute time training"),
    ("bench --json {tmp}", "argument --json: '{tmp}' is a directory; expected a file path to write"),
    ("bench --json {tmp}/no/rows.json", "argument --json: cannot write '{tmp}/no/rows.json': directory '{tmp}/no' "
                                        "does not exist"),
    ("bench --model vit_tiny_patch16_224 --img-size 8 --prompts 4",
     "--model vit_tiny_patch16_224 at --img-size 8 with --prompts 4: Calculated padded input size"),
    ("bench --model resnet18", "--model resnet18 at its default image size with --prompts 50: vpt_fast.prompt "
                               "supports the timm model classes timm.models.vision_transformer.VisionTransformer, "
                               "timm.models.eva.Eva, timm.models.swin_transformer.SwinTransformer; got "
                               "timm.models.resnet.ResNet"),
    ("memory --batches 0,-1", "argument --batches: expected a comma list of integers >= 1 such as 1,2,4, got '0,-1'"),
    ("memory --batches x", "argument --batches: expected a comma list of integers >= 1 such as 1,2,4, got 'x'"),
    ("memory --backend foo", "argument --backend: invalid choice: 'foo'"),
    ("memory --plot {tmp}", "argument --plot: '{tmp}' is a directory"),
    ("memory --max-batch --budget 1GiB --batch-limit 0", "argument --batch-limit: expected an integer >= 1, got '0'"),
    ("memory --max-batch --budget 1GiB --batches 2", "--batches goes with --total or the default activation table"),
    ("export {tmp}/missing.pth.tar {tmp}/p.safetensors", "argument checkpoint: no such file: '{tmp}/missing.pth.tar'"),
    ("export {tmp} {tmp}/p.safetensors", "argument checkpoint: '{tmp}' is a directory"),
    ("export {junk} {tmp}/p.safetensors", "argument checkpoint: '{junk}' is not a checkpoint torch.save wrote"),
    ("export {ckpt} {tmp}", "argument out: '{tmp}' is a directory"),
    ("export {ckpt} {tmp}/p.safetensors --num-prompts 0", "argument --num-prompts: expected an integer >= 1, got '0'"),
    ("export {ckpt} {tmp}/p.safetensors --model vpt_vit_smal", "argument --model: unknown model 'vit_smal'"),
])
def test_bad_input_is_one_usage_line(capsys, files, argv, message):
    """Each names the argument, what it allows and what came in (these printed tracebacks)."""
    line = _usage_error(capsys, argv.format(**files).split())
    assert message.format(**files) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_gpu_is_a_usage_error(capsys):
    line = _usage_error(capsys, ["bench", "--device", "cuda"])
    assert re.search(r"argument --device: 'cuda' needs a CUDA GPU and torch \S+ sees none here; expected cpu", line)


def test_unavailable_memory_backend_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setitem(backends._LOADED, "triton", None)
    monkeypatch.setitem(backends._REASONS, "triton", "no CUDA device")
    line = _usage_error(capsys, ["memory", "--backend", "triton"])
    assert "--backend: backend 'triton' is not available on this machine: no CUDA device" in line


def test_bench_refuses_when_no_asked_backend_can_be_timed(capsys):
    """--backends triton on the CPU used to time eager alone and exit 0 without a word."""
    line = _usage_error(capsys, ["bench", *TINY, "--backends", "triton"])
    assert line.endswith("--backends triton: nothing left to time here: 'triton' is skipped: it is timed on CUDA "
                         "devices only, not 'cpu' (Triton's CPU interpreter is for tests)")


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """`vpt-fast bench --backends triton,torch --json` in this process on ViT-Ti at 32 px, batch 1, one
    round; the resident-memory probes (fresh processes) are replaced by a stub."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(vpt_fast.bench.core, "activation_memory",
                      lambda *args: {"activation_bytes": 0, "peak_bytes": None})
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(["bench", *TINY, "--batch", "1", "--steps", "1", "--backends", "triton,torch", "--json", str(out)])
    return {"stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "warnings": caught,
            "json": json.loads(out.read_text())}


def test_bench_says_which_asked_backend_it_skips(tiny_bench):
    assert ("skipping backend 'triton': it is timed on CUDA devices only, not 'cpu' (Triton's CPU interpreter is "
            "for tests)\n") in tiny_bench["stderr"]
    assert [row["method"] for row in tiny_bench["json"]["rows"]] == ["eager", "vpt_fast[torch]"]


def test_bench_does_not_warn_about_its_own_measurement(tiny_bench):
    """Its FLOP count's module tracker used to trip the fused blocks' hook warning on every run."""
    assert [str(w.message) for w in tiny_bench["warnings"] if "hooks on" in str(w.message)] == []


def test_bench_json_records_the_commit(tiny_bench):
    """The checkout's HEAD (a commit in its history) and whether tracked files differ from it."""
    revision = tiny_bench["json"]["environment"]["git"]
    assert re.fullmatch(r"[0-9a-f]{40}", revision["commit"]) and isinstance(revision["dirty"], bool)
    root = os.path.dirname(os.path.dirname(vpt_fast.bench.__file__))
    subprocess.run(["git", "-C", root, "cat-file", "-e", revision["commit"] + "^{commit}"], check=True)


def test_commit_is_null_outside_a_checkout_of_vpt_fast(tmp_path, monkeypatch):
    """An installed package records no commit, also inside another project's repository."""
    package = tmp_path / "project" / "site-packages" / "vpt_fast"
    package.mkdir(parents=True)
    monkeypatch.setattr(vpt_fast.bench.core, "__file__", str(package / "bench" / "core.py"))
    assert vpt_fast.bench.source_revision() is None
    project = str(tmp_path / "project")
    subprocess.run(["git", "init", "-q", project], check=True)
    subprocess.run(["git", "-C", project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                    "-m", "a project that installs vpt_fast inside its tree"], check=True)
    assert vpt_fast.bench.source_revision() is None


@pytest.mark.slow  # about 20 s here: three models, a bank, a timed round and a FLOP count per method
def test_inference_bench_says_which_task_counts_it_skips(capsys):
    """A bank of more tasks than the batch has samples is not timed: the row is left out, not silently;
    and the serving bench does not warn about the banks it builds itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main(["bench", *TINY, "--batch", "1", "--steps", "1", "--inference", "--tasks", "1,2"])
    captured = capsys.readouterr()
    assert "skipping 2 tasks: a batch of 1 cannot hold one sample of each\n" in captured.err
    assert "bank: 1 tasks mixed, 1 pass" in captured.out and "bank: 2 tasks" not in captured.out


def test_inference_bench_without_banks_is_accepted(monkeypatch, capsys):
    """`--tasks ''` times the bare backbone, eager VPT and vpt_fast without any bank (the README's
    batch-8 command); it was refused as a bad task list."""
    import vpt_fast.bench.serving as serving
    asked = []
    monkeypatch.setattr(serving, "run_inference_bench", lambda cfg, tasks, log: asked.append(tasks) or [])
    monkeypatch.setattr(serving, "format_inference_table", lambda rows: "table")
    main(["bench", *TINY, "--inference", "--tasks", ""])
    assert asked == [[]]
    _usage_error(capsys, ["bench", *TINY, "--tasks", ""])  # still needs --inference


def test_bench_memory_column_follows_recompute(monkeypatch):
    """The activation memory is measured with the recompute policy that is timed (it was 'none')."""
    probed = []
    monkeypatch.setattr(vpt_fast.bench.core, "activation_memory",
                        lambda cfg, backend, recompute="none": probed.append(recompute) or {})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["bench", *TINY, "--batch", "1", "--steps", "1", "--backends", "torch", "--recompute", "block"])
    assert probed and set(probed) == {"block"}
