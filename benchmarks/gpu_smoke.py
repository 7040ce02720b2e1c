"""GPU acceptance, first piece: are the kernels right on this GPU, and how fast is the attention?

    python benchmarks/gpu_smoke.py --backends triton --out $OUT/smoke_triton.json
    python benchmarks/gpu_smoke.py --backends cuda --out $OUT/smoke_cuda.json
    python benchmarks/gpu_smoke.py --backends triton,cuda --no-checks --time --out $OUT/smoke_time.json
    VPT_GPU_DRY_RUN=1 python benchmarks/gpu_smoke.py --backends triton,cuda --time --out /tmp/smoke.json

Checks, per backend, each one record of the JSON (rewritten after every record, so a call cut
short keeps what was measured):
- `attention`: the backend's forward and all five gradients (dq, dk, dv, dpk, dpv) at ViT-B/16
  (B=128, 12 heads, 197 own + 50 shared prompt keys, d=64) and Swin-B stage-0 shapes (64 images x
  64 windows of 49 tokens, 4 heads, d=32, 50 shared prompts, a bias per window), bf16 and fp16,
  against a float64 reference: FlashAttention's rule, error <= 2 x the error of eager attention in
  the same dtype + 1e-4 x the reference's scale.
- `determinism`: two more backward calls on the same bf16 inputs give bitwise-equal gradients (the
  prompt gradients are reductions over all 128 batches or 4096 windows).
- `model`: a prompted ViT-S/16 (224 px, 50 deep prompts, batch 8) — logits and the gradients of
  the prompts and the head — against the `reference` backend (release-style VPT): fp32 within 1e-4
  relative, bf16 autocast by the rule above (plus one bf16 ulp at the tensor's scale).
- `--time`: forward + backward of the attention at both shapes in bf16, per backend and for
  PyTorch's SDPA (its default choice, and cuDNN alone) on the concatenated keys, median ms.
Every planned check is in the file from the start as "pending"; a check that would start after
`--deadline-s` is recorded as skipped; a backend that cannot run here is recorded as an error, and
after a sticky CUDA error the remaining checks as "not run". Exit status 3 when a check raised (or
anything else did), else 1 when a check failed, was skipped or stayed pending, else 0.
`--verdict FILE BACKEND` says whether run_gpu.sh times BACKEND: its attention ran right at least
once and nothing raised (a backend that missed a bound is timed, and reported failing).

VPT_GPU_DRY_RUN=1: tiny shapes and a 2-block ViT-Tiny on the CPU (the triton backend under
TRITON_INTERPRET=1, the cuda backend's C++ CPU twin): every code path of a GPU call, in seconds.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the test suite's reference helpers

from gpu_headline import full_environment, write_json  # noqa: E402

from utils import eager_attention_low_precision, low_precision_results, max_error, rel_error, rule_factor  # noqa: E402
from vpt_fast.backends import backend_module, validate_backend  # noqa: E402
from vpt_fast.bench import BenchConfig, build_model, interleaved_times, make_batch  # noqa: E402

DRY_RUN = os.environ.get("VPT_GPU_DRY_RUN") == "1"
# name: (query batches B, heads H, own tokens N, prompts P, prompt batches Bp, head dim d, bias windows)
SHAPES = {"vit_b": (128, 12, 197, 50, 1, 64, 0), "swin_b_stage0": (64 * 64, 4, 49, 50, 1, 32, 64)}
DRY_SHAPES = {"vit_b": (2, 2, 9, 3, 1, 64, 0), "swin_b_stage0": (8, 2, 9, 3, 1, 32, 4)}
MODEL = BenchConfig(model="vit_small_patch16_224", batch=8, num_prompts=50, device="cuda")
DRY_MODEL = BenchConfig(model="vit_tiny_patch16_224", batch=2, num_prompts=3, img_size=32,
                        model_kwargs={"depth": 2})
GRAD_NAMES = ("dq", "dk", "dv", "dpk", "dpv")


def attention_inputs(shape, dtype: torch.dtype, device: str, seed: int = 0):
    """q, k, v as timm's views of one qkv buffer, pk, pv shared by the batch, bias, dout."""
    B, H, N, P, Bp, d, nb = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dtype)

    q, k, v = rnd(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    pk, pv = rnd(Bp, H, P, d), rnd(Bp, H, P, d)
    bias = rnd(nb, H, N, N) if nb else None
    return q, k, v, pk, pv, bias, rnd(B, H, N, d)


def run_backend(impl, q, k, v, pk, pv, bias, dout, scale):
    out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    return [out, *impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)]


def check_attention(backend: str, shape, dtype: torch.dtype, device: str) -> dict:
    impl = backend_module(backend)
    args = attention_inputs(shape, dtype, device)
    scale = shape[5] ** -0.5
    got = run_backend(impl, *args, scale)
    wide = [None if t is None else t.double() for t in args]
    ref_out, ref_grads = eager_attention_low_precision(*wide, scale)
    eager_out, eager_grads = eager_attention_low_precision(*args, scale)
    tensors, ok = {}, True
    for name, x, r, e in zip(("out",) + GRAD_NAMES, got, [ref_out, *ref_grads], [eager_out, *eager_grads]):
        err, base = max_error(x, r), max_error(e, r)
        bound = rule_factor(backend) * base + 1e-4 * max(1.0, r.abs().max().item())
        tensors[name] = {"err": err, "eager_err": base, "bound": bound, "ratio": err / base if base else None}
        ok = ok and err <= bound  # NaN fails
    return {"status": "ok" if ok else "fail", "tensors": tensors}


def check_determinism(backend: str, shape, device: str) -> dict:
    impl = backend_module(backend)
    q, k, v, pk, pv, bias, dout = attention_inputs(shape, torch.bfloat16, device)
    scale = shape[5] ** -0.5
    out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    first = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
    differing = {name: 0 for name in GRAD_NAMES}
    for _ in range(2):
        again = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
        for name, x, y in zip(GRAD_NAMES, first, again):
            differing[name] += int((x != y).sum())
    return {"status": "ok" if not any(differing.values()) else "fail", "differing_elements": differing}


def check_model(backend: str, cfg: BenchConfig) -> dict:
    model = build_model(cfg)
    x, y = make_batch(cfg, model)
    reference, in_fp32, eager_bf16, got = low_precision_results(model, backend, x, y, torch.device(cfg.device).type)
    fp32 = {n: rel_error(t, reference[n]) for n, t in in_fp32.items()}
    bf16, ok = {}, max(fp32.values()) < 1e-4
    for name, t in got.items():
        ref = reference[name]
        err, base = max_error(t, ref), max_error(eager_bf16[name], ref)
        bound = rule_factor(backend) * base + torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
        bf16[name] = {"err": err, "eager_err": base, "bound": bound}
        ok = ok and err <= bound
    return {"status": "ok" if ok else "fail", "fp32_rel_err": fp32, "fp32_tol": 1e-4, "bf16": bf16,
            "model": cfg.model, "batch": cfg.batch, "num_prompts": cfg.num_prompts}


def time_attention(backends: list[str], shape, device: str, iters: int) -> dict:
    """Forward + backward ms in bf16: each backend's primitives, and SDPA on the concatenated keys
    (its default choice, and cuDNN alone on a GPU), timed round-robin (`interleaved_times`)."""
    q, k, v, pk, pv, bias, dout = attention_inputs(shape, torch.bfloat16, device)
    scale = shape[5] ** -0.5
    fns = {b: functools.partial(run_backend, backend_module(b), q, k, v, pk, pv, bias, dout, scale) for b in backends}
    B, H, N, P = shape[:4]
    joint_k = torch.cat([pk.expand(B, -1, -1, -1), k], 2).detach().requires_grad_()
    joint_v = torch.cat([pv.expand(B, -1, -1, -1), v], 2).detach().requires_grad_()
    q_ = q.detach().requires_grad_()
    mask = None
    if bias is not None:  # zero on the prompt columns, the window's bias on its own keys
        mask = F.pad(bias.repeat(B // bias.shape[0], 1, 1, 1), (P, 0))

    def sdpa():
        out = F.scaled_dot_product_attention(q_, joint_k, joint_v, attn_mask=mask, scale=scale)
        return torch.autograd.grad(out, (q_, joint_k, joint_v), dout)

    fns["sdpa"] = sdpa
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return sdpa()

        fns["sdpa_cudnn"] = sdpa_cudnn
    timings = {}
    for name, fn in list(fns.items()):  # one call each first: what raises is reported, the rest timed
        try:
            fn()
        except Exception as exc:  # noqa: BLE001  (e.g. cuDNN refusing the mask; the others still count)
            timings[name] = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            del fns[name]
    for name, seconds in interleaved_times(fns, steps=iters, warmup=3, device=device).items():
        timings[name] = statistics.median(seconds) * 1e3
    return {"status": "ok", "ms": timings, "note": "SDPA times exclude the concatenation of prompt and own keys"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON file (rewritten after every check)")
    parser.add_argument("--verdict", nargs=2, metavar=("FILE", "BACKEND"),
                        help="exit 0 when BACKEND may be timed after the checks in FILE, else 1 (says why)")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--time", action="store_true", help="time the attention (the GPU must be quiet)")
    parser.add_argument("--no-checks", dest="checks", action="store_false", help="no correctness checks")
    parser.add_argument("--iters", type=int, default=20 if not DRY_RUN else 2)
    parser.add_argument("--deadline-s", type=float, default=90.0, help="no check starts after this many seconds")
    args = parser.parse_args()
    if args.verdict:
        usable, why = verdict(*args.verdict)
        print(f"{args.verdict[1]}: {'timed' if usable else 'not timed'} ({why})", flush=True)
        return 0 if usable else 1
    if not args.out:
        parser.error("--out is required")
    device = "cpu" if DRY_RUN else "cuda"
    if not DRY_RUN and not torch.cuda.is_available():
        parser.error("no CUDA device (VPT_GPU_DRY_RUN=1 runs the CPU dry run)")
    shapes = DRY_SHAPES if DRY_RUN else SHAPES
    model_cfg = DRY_MODEL if DRY_RUN else MODEL
    requested = [b for b in args.backends.split(",") if b]
    unavailable = {}
    for backend in requested:
        try:
            validate_backend(backend)
        except (ValueError, RuntimeError) as exc:  # recorded: a missing extension is a finding, not a typo
            unavailable[backend] = str(exc)
    backends = [b for b in requested if b not in unavailable]
    start = time.perf_counter()
    report = {"dry_run": DRY_RUN, "device": device, "backends": requested, "shapes": shapes,
              "command": " ".join([os.path.relpath(__file__)] + sys.argv[1:]), "env": full_environment(),
              "records": [dict(check="available", backend=b, status="error", error=why)
                          for b, why in unavailable.items()]}
    checks = []
    for backend in backends if args.checks else []:
        for name, shape in shapes.items():
            for dtype in (torch.bfloat16, torch.float16):
                checks.append((dict(check="attention", backend=backend, shape=name, dtype=str(dtype)[6:]),
                               lambda b=backend, shape=shape, dtype=dtype: check_attention(b, shape, dtype, device)))
            checks.append((dict(check="determinism", backend=backend, shape=name, dtype="bfloat16"),
                           lambda b=backend, shape=shape: check_determinism(b, shape, device)))
        checks.append((dict(check="model", backend=backend),
                       lambda backend=backend: check_model(backend, model_cfg)))
    if args.time:
        for name, shape in shapes.items():
            checks.append((dict(check="time", shape=name, dtype="bfloat16"),
                           lambda shape=shape: time_attention(backends, shape, device, args.iters)))
    # every planned check is in the file from the start: a piece cut short leaves "pending", not nothing
    report["records"] += [dict(label, status="pending") for label, _ in checks]
    write_json(args.out, report)
    for record in report["records"][:len(unavailable)]:
        print(f"[smoke] {summary_line(record)}", flush=True)
    poisoned = None  # the check after which the CUDA context is unusable (a sticky kernel error)
    for record, (_, run) in zip(report["records"][len(unavailable):], checks):
        elapsed = time.perf_counter() - start
        if poisoned:
            record.update(status="error", error=f"not run: the CUDA context is unusable after {poisoned}")
        elif elapsed > args.deadline_s:
            record.update(status="skipped", error=f"{elapsed:.0f} s into the piece, past --deadline-s")
        else:
            t0 = time.perf_counter()
            try:
                record.update(run())
                if device == "cuda":
                    torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001  (every failure becomes a record)
                record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                              traceback=traceback.format_exc()[-3000:])
                if device == "cuda" and not cuda_usable():
                    poisoned = summary_line(record).split(":")[0]
            record["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(args.out, report)
        print(f"[smoke] {summary_line(record)}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, report)
    statuses = {r["status"] for r in report["records"]}
    return 3 if "error" in statuses else 1 if statuses - {"ok"} else 0


def cuda_usable() -> bool:
    """False after a sticky CUDA error (illegal address, device assert): every later call fails."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return True
    except Exception:  # noqa: BLE001  (any failure means unusable)
        return False


def verdict(path: str, backend: str) -> tuple[bool, str]:
    """Whether `backend` may be timed after the checks in `path`: its attention ran right at least
    once and nothing raised. A backend that ran but missed a bound is timed (and reported failing)."""
    if not os.path.exists(path):
        return False, f"{path} was not written (the checks died before their first record)"
    with open(path) as f:
        records = [r for r in json.load(f)["records"] if r.get("backend") == backend]
    errors = [summary_line(r) for r in records if r["status"] == "error"]
    if errors:
        return False, f"{len(errors)} check(s) raised, first: {errors[0]}"
    if not any(r["check"] == "attention" and r["status"] == "ok" for r in records):
        return False, "no attention check passed"
    return True, f"{sum(r['status'] == 'ok' for r in records)} of {len(records)} checks ok"


def summary_line(record: dict) -> str:
    """One line per check: what ran, its verdict, its worst number."""
    head = " ".join(str(record[k]) for k in ("check", "backend", "shape", "dtype") if k in record)
    detail = ""
    if "tensors" in record:
        worst = max(record["tensors"].items(), key=lambda kv: kv[1]["err"] / kv[1]["bound"])
        detail = f"worst {worst[0]}: err {worst[1]['err']:.2e} (eager {worst[1]['eager_err']:.2e})"
    elif "differing_elements" in record:
        detail = f"differing elements {record['differing_elements']}"
    elif "fp32_rel_err" in record:
        detail = (f"fp32 max rel err {max(record['fp32_rel_err'].values()):.1e}, bf16 worst err/bound "
                  f"{max(v['err'] / v['bound'] for v in record['bf16'].values()):.2f}")
    elif "ms" in record:
        detail = ", ".join(f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in record["ms"].items())
    error = f" {record['error']}" if record.get("error") else ""
    return f"{head}: {record['status']} ({record.get('seconds', 0)} s) {detail}{error}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001  (an unexpected failure must not read as "a bound was missed")
        traceback.print_exc()
        sys.exit(3)
