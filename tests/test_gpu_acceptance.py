"""The GPU acceptance call (`bash benchmarks/run_gpu.sh acceptance`) rehearsed on the CPU: its dry run
(VPT_GPU_DRY_RUN=1: tiny shapes, the triton backend under TRITON_INTERPRET=1, the cuda backend's C++
twin, inductor's CPU code, cold compile caches as on a fresh machine) runs every piece's code path,
writes every file the call brings back, and the deadline, timeout and refusal paths behave. A typo
must not cost GPU time."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_headline  # noqa: E402

CALL_FILES = {"call.log", "smoke_triton.json", "smoke_cuda.json", "smoke_time.json", "warm.json",
              "warm_cuda.json", "headline.json", "swin.json"}


def _env(tmp_path, **extra) -> dict:
    env = dict(os.environ, VPT_GPU_DRY_RUN="1", TRITON_INTERPRET="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env.update(extra)
    return env


def _script(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_dry_run_of_the_acceptance_call(tmp_path):
    out = tmp_path / "out"
    run = _script("bash", "benchmarks/run_gpu.sh", "acceptance", timeout=900,
                  env=_env(tmp_path, OUT=str(out), VPT_REVISION="dry-run-test"))
    log = (out / "call.log").read_text() if (out / "call.log").exists() else run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    # what the device returns: at most 8 files, none in a folder
    assert {p.name for p in out.iterdir()} == CALL_FILES and len(CALL_FILES) <= 8
    assert all(p.is_file() for p in out.iterdir())

    for name, backend in (("smoke_triton", "triton"), ("smoke_cuda", "cuda")):
        smoke = _load(out / f"{name}.json")
        assert smoke["dry_run"] and smoke["env"]["revision"] == "dry-run-test"
        checks = sorted((r["check"], r.get("shape"), r.get("dtype")) for r in smoke["records"])
        assert checks == sorted([("attention", s, d) for s in ("vit_b", "swin_b_stage0")
                                 for d in ("bfloat16", "float16")]
                                + [("determinism", s, "bfloat16") for s in ("vit_b", "swin_b_stage0")]
                                + [("model", None, None)])
        assert all(r["status"] == "ok" and r["backend"] == backend for r in smoke["records"]), smoke["records"]
    timing = _load(out / "smoke_time.json")["records"]
    assert [r["shape"] for r in timing] == ["vit_b", "swin_b_stage0"]
    assert all(set(r["ms"]) == {"triton", "cuda", "sdpa"} and r["status"] == "ok" for r in timing)

    warm = _load(out / "warm.json")
    assert warm["kind"] == "warm" and [r["method"] for r in warm["records"]] == ["eager_compile", "triton_compile"]
    assert [r["method"] for r in _load(out / "warm_cuda.json")["records"]] == ["cuda_compile"]
    headline = _load(out / "headline.json")
    methods = [r["method"] for r in headline["records"]]
    fastest = gpu_headline.fastest_backend(headline["records"], "cpu")
    assert fastest in ("triton", "cuda")
    assert methods == ["eager", "triton", "cuda", f"{fastest}_block", "eager_compile", f"{fastest}_compile"]
    assert headline["command"].count("gpu_headline.py") == 2  # the compiled methods appended to the same run
    swin = _load(out / "swin.json")
    assert [r["method"] for r in swin["records"]] == ["eager", fastest]
    for run_ in (warm, headline, swin):
        records = run_["records"]
        assert all(r["status"] == "ok" for r in records), [(r["method"], r.get("error")) for r in records]
        # same weights, batch and seed: every method's first loss is eager's up to bf16 noise
        first = [r["losses"][0] for r in records]
        assert max(first) - min(first) < 0.02 * abs(first[0]), first
    readme = gpu_headline.summarize(str(out))
    assert "**Dry run**" in readme and "| ViT-B/16 step, fastest backend / eager | >= 1.5 |" in readme
    assert "| CUDA kernels: determinism | bitwise-equal gradients over reruns | 2 checks | cuda | met |" in readme
    assert "| Triton kernels: model | ViT-S/16 logits and gradients vs reference | 1 checks | triton | met |" in readme
    assert "triton: timed (7 of 7 checks ok)" in log and "cuda: timed (7 of 7 checks ok)" in log
    assert readme.strip() in log  # the call prints its README last


FAKE_PYTHON = """#!/usr/bin/env bash
# the device query, the versions, the kernel checks and the timed pieces answer at once; the
# README is the real interpreter's
case " $* " in
  " -c "*) echo cpu; exit 0 ;;
  " - ") cat > /dev/null; echo '{"versions": "fake"}'; exit 0 ;;
  *"gpu_smoke.py --backends triton --out"*) echo "fake triton checks"; exit "$FAKE_TRITON_RC" ;;
  *"gpu_smoke.py --backends cuda --out"*) echo "fake cuda checks"; exit "$FAKE_CUDA_RC" ;;
  # the verdict: a backend whose checks only missed a bound (1) is timed; one that raised or hung is not
  *"gpu_smoke.py --verdict "*" triton "*) (( FAKE_TRITON_RC <= 1 )); exit ;;
  *"gpu_smoke.py --verdict "*" cuda "*) (( FAKE_CUDA_RC <= 1 )); exit ;;
  *"gpu_headline.py --summarize"*) ;;
  *gpu_smoke.py* | *gpu_headline.py*) echo "fake: $*"; exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def _fake_python(tmp_path) -> str:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return str(python)


def test_acceptance_call_past_its_deadline_runs_nothing_and_says_so(tmp_path):
    out = tmp_path / "out"
    run = _script("bash", "benchmarks/run_gpu.sh", "acceptance",
                  env=_env(tmp_path, OUT=str(out), DEADLINE_S="1", PYTHON=_fake_python(tmp_path),
                           REAL_PYTHON=sys.executable))
    log = (out / "call.log").read_text()
    assert run.returncode == 75, log  # a piece that did not run must not read as a pass
    for piece in ("smoke_triton.json", "warm.json", "warm_cuda.json", "smoke_cuda.json", "smoke_time.json",
                  "headline.json", "swin.json"):
        assert f"skipping {piece}" in log
    assert {p.name for p in out.iterdir()} == {"call.log"}
    assert "| ViT-B/16 step, fastest backend / eager | >= 1.5 | - | - | not measured |" in log


def test_acceptance_call_refuses_what_it_cannot_do(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    run = _script("bash", "benchmarks/run_gpu.sh", "acceptance", "headline", env=env)
    assert run.returncode == 2 and "acceptance is a call of its own" in run.stderr
    run = _script("bash", "benchmarks/run_gpu.sh", "acceptanse", env=env)
    assert run.returncode == 2 and "unknown step 'acceptanse'" in run.stderr
    run = _script("bash", "benchmarks/run_gpu.sh", "acceptance", env=dict(env, VPT_GPU_DRY_RUN="1"))
    assert run.returncode == 2 and "into $OUT" in run.stderr


@pytest.mark.parametrize("triton_rc,cuda_rc,timed", [
    ("0", "3", "triton"),        # the cuda checks raised: cuda is not timed
    ("1", "0", "triton,cuda"),   # a missed bound is timed (and reported), not dropped
    ("124", "137", "torch"),     # both hung: the portable backend is timed instead
])
def test_a_backend_whose_checks_raise_or_hang_is_not_timed(tmp_path, triton_rc, cuda_rc, timed):
    out = tmp_path / "out"
    run = _script("bash", "benchmarks/run_gpu.sh", "acceptance",
                  env=_env(tmp_path, OUT=str(out), PYTHON=_fake_python(tmp_path), REAL_PYTHON=sys.executable,
                           FAKE_TRITON_RC=triton_rc, FAKE_CUDA_RC=cuda_rc))
    log = (out / "call.log").read_text()
    assert run.returncode == int(cuda_rc if cuda_rc != "0" else triton_rc), log  # the first failure's
    assert f"fake: benchmarks/gpu_smoke.py --backends {timed} --no-checks --time" in log
    assert f"fake: benchmarks/gpu_headline.py --methods eager,{timed},fastest_block --no-flops " in log
    assert "fake: benchmarks/gpu_headline.py --setting swin_b --methods eager,fastest --no-flops " in log
    assert "fake: benchmarks/gpu_headline.py --methods eager_compile,fastest_compile --append " in log


def test_headline_deadline_and_timeout_become_records(tmp_path):
    out = tmp_path / "headline.json"
    run = _script(sys.executable, "benchmarks/gpu_headline.py", "--methods", "eager,fastest_compile",
                  "--deadline-s", "0", "--out", str(out), env=_env(tmp_path))
    assert run.returncode == 1
    records = _load(out)["records"]
    assert [(r["method"], r["status"]) for r in records] == [("eager", "skipped"), (records[1]["method"], "skipped")]
    assert records[1]["requested"] == "fastest_compile" and "deadline" in records[1]["error"]
    # a method past its timeout is killed (with the processes it started) and recorded as such
    run = _script(sys.executable, "benchmarks/gpu_headline.py", "--methods", "eager", "--method-timeout-s", "1",
                  "--min-method-s", "0", "--out", str(out), env=_env(tmp_path))
    assert run.returncode == 1
    (record,) = _load(out)["records"]
    assert record["status"] == "timeout" and record["error"] == "killed after 1 s"
    run = _script(sys.executable, "benchmarks/gpu_headline.py", "--methods", "eager_fast", "--out", str(out),
                  env=_env(tmp_path))
    assert run.returncode != 0 and "method must be" in run.stderr


def test_smoke_records_an_unavailable_backend_and_its_deadline(tmp_path):
    out = tmp_path / "smoke.json"
    run = _script(sys.executable, "benchmarks/gpu_smoke.py", "--backends", "cuda,nope", "--deadline-s", "0",
                  "--time", "--out", str(out), env=_env(tmp_path))
    assert run.returncode == 3  # a backend that cannot run: run_gpu.sh leaves it out of the timed pieces
    records = _load(out)["records"]
    assert records[0]["check"] == "available" and records[0]["backend"] == "nope" and records[0]["status"] == "error"
    assert {r["status"] for r in records[1:]} == {"skipped"} and len(records) == 1 + 7 + 2


def _record(method, img_per_s, peak, status="ok"):
    backend, recompute, compiled = gpu_headline.parse_method(method)
    return {"method": method, "backend": backend, "recompute": recompute, "compile": compiled,
            "status": status, "img_per_s": img_per_s, "peak_memory_bytes": peak}


def test_targets_are_judged_on_the_fastest_method_of_one_run():
    headline = {"records": [_record("eager", 100.0, 1000), _record("triton", 160.0, 550),
                            _record("cuda", 140.0, 500), _record("triton_block", 120.0, 160),
                            _record("eager_compile", 120.0, 900), _record("triton_compile", 140.0, 500)]}
    swin = {"records": [_record("eager", 50.0, 10), _record("triton", 0.0, 0, status="crashed")]}
    table = gpu_headline.format_targets(headline, swin, [])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["ViT-B/16 step, fastest backend / eager"].endswith("| 1.600 | triton | met |")
    # the fastest backend's peak (triton's 0.55), not the smallest peak among backends (cuda's 0.50)
    assert rows["ViT-B/16 peak memory, fastest backend / eager"].endswith("| 0.550 | triton | met |")
    assert rows['ViT-B/16 peak memory, recompute="block" / eager'].endswith("| 0.160 | triton_block | missed |")
    assert rows["ViT-B/16 step under torch.compile, fastest / eager"].endswith("| 1.167 | triton_compile | missed |")
    assert rows["Swin-B step, the ViT-B run's fastest backend / eager"].endswith("| - | - | not measured |")
    assert rows["CUDA kernels: attention"].endswith("| 0 checks | cuda | not measured |")
    # with kernel checks: a speed row on a backend that missed one says so; a check cut short is not "met"
    ok = [{"check": c, "backend": "triton", "status": "ok"} for c, n in gpu_headline.EXPECTED_CHECKS.items()
          for _ in range(n)]
    smokes = [{"records": ok[:-1] + [dict(ok[-1], status="fail")]},
              {"records": [{"check": "attention", "backend": "cuda", "status": s} for s in ("ok", "ok", "pending")]}]
    table = gpu_headline.format_targets(headline, swin, smokes)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["ViT-B/16 step, fastest backend / eager"].endswith(
        "| 1.600 | triton | met (triton did not pass all its kernel checks) |")
    assert rows["Triton kernels: model"].endswith("| 1 checks | triton | missed (fail) |")
    assert rows["Triton kernels: attention"].endswith("| 4 checks | triton | met |")
    assert rows["CUDA kernels: attention"].endswith("| 3 checks | cuda | incomplete: 2 of 4 ran ok |")
