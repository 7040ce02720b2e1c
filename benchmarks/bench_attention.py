"""Prompt-aware attention vs `F.scaled_dot_product_attention` on the concatenated keys.

ViT-B/16 deep VPT shape (B=128, H=12, N=197, P=50 batch-shared prompts, d=64, bf16). The prompt-aware
backends read the shared prompt segment once (batch stride 0); SDPA needs the release-style
concatenation [pk.expand(B); k], which is inside the timed region as it is in eager VPT. The
"64_tasks" cases stack 64 tasks' prompt sets (S, H, P, d) read per sample by `prompt_index` (mixed
serving/training, sample b on task b % 64); SDPA then concatenates the gathered sets [pk[index]; k].
Mode "fwd_bwd_dqkv" writes dq, dk, dv into one (B, N, 3, H, d) buffer (the qkv projection's
gradient) instead of three.
Run: `pytest benchmarks/bench_attention.py --benchmark-only` (skipped without CUDA). Compare ratios
within one run only (docs/design.md §6).
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import per_second

from vpt_fast.backends import backend_module
from vpt_fast.backends.flops import attention_flops
from vpt_fast.bench import environment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, H, N, P, D = 128, 12, 197, 50, 64
DTYPE = torch.bfloat16
SCALE = D ** -0.5
FWD_FLOP = attention_flops((B, H, N, D), (B, H, N, D), (1, H, P, D))
FLOP = {"fwd": FWD_FLOP, "fwd_bwd": FWD_FLOP + FWD_FLOP * 5 // 2}  # FlashAttention's convention
FLOP["fwd_bwd_dqkv"] = FLOP["fwd_bwd"]
PROMPT_SETS = {"shared": 1, "64_tasks": 64}


def _inputs(sets: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=DTYPE, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    pk = torch.randn(sets, H, P, D, device="cuda", dtype=DTYPE, generator=g)
    pv = torch.randn(sets, H, P, D, device="cuda", dtype=DTYPE, generator=g)
    dout = torch.randn(B, H, N, D, device="cuda", dtype=DTYPE, generator=g)
    index = None if sets == 1 else torch.arange(B, device="cuda") % sets
    return q, k, v, pk, pv, dout, index


def _primitive_fn(module, mode, sets):
    q, k, v, pk, pv, dout, index = _inputs(sets)
    indexed = {} if index is None else {"prompt_index": index}
    packed = {"dqkv": torch.empty(B, N, 3, H, D, device="cuda", dtype=DTYPE)} if mode == "fwd_bwd_dqkv" else {}

    def fwd():
        return module.attention_fwd(q, k, v, pk, pv, SCALE, **indexed)

    def fwd_bwd():
        out, lse = module.attention_fwd(q, k, v, pk, pv, SCALE, **indexed)
        return module.attention_bwd(dout, q, k, v, pk, pv, out, lse, SCALE, **indexed, **packed)

    return fwd if mode == "fwd" else fwd_bwd


def _sdpa_fn(sdpa_backend, mode, sets):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, pk, pv, dout, index = _inputs(sets)
    if mode == "fwd_bwd":
        q, k, v, pk, pv = (t.detach().requires_grad_() for t in (q, k, v, pk, pv))
    backend = getattr(SDPBackend, sdpa_backend)

    def fwd():
        pk_rows = pk.expand(B, -1, -1, -1) if index is None else pk[index]
        pv_rows = pv.expand(B, -1, -1, -1) if index is None else pv[index]
        kk = torch.cat([pk_rows, k], dim=2)
        vv = torch.cat([pv_rows, v], dim=2)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, kk, vv, scale=SCALE)

    def fwd_bwd():
        out = fwd()
        return torch.autograd.grad(out, (q, k, v, pk, pv), dout)

    return fwd if mode == "fwd" else fwd_bwd


def _bench(benchmark, name, mode, prompts, fn):
    try:
        fn()
        torch.cuda.synchronize()
    except (NotImplementedError, TypeError) as e:  # TypeError: a backend without prompt_index / dqkv
        pytest.skip(f"{name}: not implemented: {e}")
    except RuntimeError as e:  # e.g. SDPA "No available kernel"
        pytest.skip(f"{name}: cannot run this shape: {str(e).splitlines()[0]}")

    def timed():
        fn()
        torch.cuda.synchronize()  # pytest-benchmark times host wall clock

    benchmark.group = f"attention-{mode}-{prompts}"
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(impl=name, mode=mode, shape=dict(B=B, H=H, N=N, P=P, d=D, S=PROMPT_SETS[prompts]),
                                dtype=str(DTYPE), flop=FLOP[mode])
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, warmup_rounds=5, rounds=30, iterations=1)
    benchmark.extra_info["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    benchmark.extra_info["tflops"] = per_second(benchmark, FLOP[mode] / 1e12)


MODES = ["fwd", "fwd_bwd"]


@pytest.mark.parametrize("prompts", list(PROMPT_SETS))
@pytest.mark.parametrize("mode", MODES + ["fwd_bwd_dqkv"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_attention(benchmark, backend, mode, prompts):
    module = backend_module(backend)
    if module is None:
        pytest.skip(f"backend {backend!r} is not available on this machine")
    _bench(benchmark, f"vpt_fast-{backend}", mode, prompts, _primitive_fn(module, mode, PROMPT_SETS[prompts]))


@pytest.mark.parametrize("prompts", list(PROMPT_SETS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sdpa_backend",
                         ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
def test_sdpa_concatenated(benchmark, sdpa_backend, mode, prompts):
    _bench(benchmark, f"sdpa-{sdpa_backend.lower()}", mode, prompts, _sdpa_fn(sdpa_backend, mode, PROMPT_SETS[prompts]))
