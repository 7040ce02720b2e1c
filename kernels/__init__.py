"""Triton kernels of vpt_fast (installed as package `vpt_fast.kernels`).

One file per op, `@triton.jit` code only: `_<op>_fwd` / `_<op>_bwd`. The launches, argument checks and
torch custom-op registration live in `vpt_fast/backends/triton_impl/<op>.py` (docs/design.md §3).
"""
