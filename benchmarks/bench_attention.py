"""Prompt-aware attention vs `F.scaled_dot_product_attention` on the concatenated keys.

ViT-B/16 deep VPT shape (B=128, H=12, N=197, P=50 batch-shared prompts, d=64, bf16). The prompt-aware
backends read the shared prompt segment once (batch stride 0); SDPA needs the release-style
concatenation [pk.expand(B); k], which is inside the timed region as it is in eager VPT.
Run: `pytest benchmarks/bench_attention.py --benchmark-only` (skipped without CUDA). Compare ratios
within one run only (docs/design.md §6).
"""
import pytest
import torch
import torch.nn.functional as F

from vpt_fast.backends import backend_module
from vpt_fast.backends.flops import attention_flops
from vpt_fast.bench import environment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, H, N, P, D = 128, 12, 197, 50, 64
DTYPE = torch.bfloat16
SCALE = D ** -0.5
FWD_FLOP = attention_flops((B, H, N, D), (B, H, N, D), (1, H, P, D))
FLOP = {"fwd": FWD_FLOP, "fwd_bwd": FWD_FLOP + FWD_FLOP * 5 // 2}  # FlashAttention's convention


def _inputs():
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=DTYPE, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    pk = torch.randn(1, H, P, D, device="cuda", dtype=DTYPE, generator=g)
    pv = torch.randn(1, H, P, D, device="cuda", dtype=DTYPE, generator=g)
    dout = torch.randn(B, H, N, D, device="cuda", dtype=DTYPE, generator=g)
    return q, k, v, pk, pv, dout


def _primitive_fn(module, mode):
    q, k, v, pk, pv, dout = _inputs()

    def fwd():
        return module.attention_fwd(q, k, v, pk, pv, SCALE)

    def fwd_bwd():
        out, lse = module.attention_fwd(q, k, v, pk, pv, SCALE)
        return module.attention_bwd(dout, q, k, v, pk, pv, out, lse, SCALE)

    return fwd if mode == "fwd" else fwd_bwd


def _sdpa_fn(sdpa_backend, mode):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, pk, pv, dout = _inputs()
    if mode == "fwd_bwd":
        q, k, v, pk, pv = (t.detach().requires_grad_() for t in (q, k, v, pk, pv))
    backend = getattr(SDPBackend, sdpa_backend)

    def fwd():
        kk = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
        vv = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, kk, vv, scale=SCALE)

    def fwd_bwd():
        out = fwd()
        return torch.autograd.grad(out, (q, k, v, pk, pv), dout)

    return fwd if mode == "fwd" else fwd_bwd


def _bench(benchmark, name, mode, fn):
    try:
        fn()
        torch.cuda.synchronize()
    except NotImplementedError as e:
        pytest.skip(f"{name}: not implemented: {e}")
    except RuntimeError as e:  # e.g. SDPA "No available kernel"
        pytest.skip(f"{name}: cannot run this shape: {str(e).splitlines()[0]}")

    def timed():
        fn()
        torch.cuda.synchronize()  # pytest-benchmark times host wall clock

    benchmark.group = f"attention-{mode}"
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(impl=name, mode=mode, shape=dict(B=B, H=H, N=N, P=P, d=D),
                                dtype=str(DTYPE), flop=FLOP[mode])
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, warmup_rounds=5, rounds=30, iterations=1)
    benchmark.extra_info["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        benchmark.extra_info["tflops"] = FLOP[mode] / benchmark.stats.stats.median / 1e12
    except AttributeError:
        pass


MODES = ["fwd", "fwd_bwd"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_prompt_attention(benchmark, backend, mode):
    module = backend_module(backend)
    if module is None:
        pytest.skip(f"backend {backend!r} is not available on this machine")
    _bench(benchmark, f"vpt_fast-{backend}", mode, _primitive_fn(module, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sdpa_backend",
                         ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"])
def test_sdpa_concatenated(benchmark, sdpa_backend, mode):
    _bench(benchmark, f"sdpa-{sdpa_backend.lower()}", mode, _sdpa_fn(sdpa_backend, mode))
