"""Compile the triton backend's kernels for a GPU architecture on a machine without a GPU.

Two steps, because the CPU interpreter and the compiler need different processes (`TRITON_INTERPRET`
is read when triton is imported):

1. `capture(cases)` (interpreter process): runs the triton primitives with the GPU launch
   configuration (block sizes, warps, stages: each op module's `INTERPRET` set to False) on CPU tensors,
   and records each kernel launch (kernel, argument types, constexpr values, launch options) instead of
   running it. The primitives' outputs are therefore uninitialised; nothing reads them.
2. `python tests/kernel_compile.py SPECS.json --arch 90` (a process without `TRITON_INTERPRET`):
   `triton.compile` of every recorded specialisation for `cuda:<arch>` with the installed triton and
   its bundled ptxas, one JSON line per kernel with the result.

This is how kernels are checked against the triton version of a GPU machine before a GPU is at hand
(tests/test_kernel_compile.py; any triton version can run step 2 on the same specs).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable

OP_MODULES = ("attention", "layer_norm", "add_layer_norm", "bias_gelu", "rms_norm", "swiglu", "rope")
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.int64": "i64",
                "torch.int32": "i32", "torch.bool": "i1", "torch.uint8": "u8"}


def _describe(value) -> list:
    """A JSON description of one kernel argument: what its type in the signature depends on."""
    import torch
    if isinstance(value, torch.Tensor):
        return ["ptr", _DTYPE_NAMES[str(value.dtype)]]
    if value is None:
        return ["none"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if isinstance(value, str):
        return ["str", value]
    raise TypeError(f"kernel argument of unsupported type {type(value).__name__}: {value!r}")


def capture(cases: Iterable[Callable[[], object]]) -> list[dict]:
    """The distinct kernel launches of `cases` (callables running triton primitives on CPU tensors)
    under the GPU launch configuration: [{"kernel": "module:name", "args": [...], "kwargs": {...}}]."""
    modules = [importlib.import_module(f"vpt_fast.backends.triton_impl.{name}") for name in OP_MODULES]
    saved = [(module, vars(module).get("INTERPRET"), module.launch) for module in modules]
    specs: dict[str, dict] = {}

    def recording_launch(kernel, grid):
        fn = getattr(kernel, "fn", kernel)  # the interpreter wraps the Python function

        def record(*args, **kwargs):
            spec = {"kernel": f"{fn.__module__}:{fn.__name__}", "args": [_describe(a) for a in args],
                    "kwargs": {k: _describe(v) for k, v in sorted(kwargs.items())}}
            specs.setdefault(json.dumps(spec, sort_keys=True), spec)
        return record

    try:
        for module in modules:
            if "INTERPRET" in vars(module):  # the modules that pick launch configurations by it
                module.INTERPRET = False
            module.launch = recording_launch
        for case in cases:
            case()
    finally:
        for module, interpret, launch in saved:
            module.launch = launch
            if interpret is not None:
                module.INTERPRET = interpret
    return list(specs.values())


def signature_of(fn, spec: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, launch options) of a recorded launch of the JITFunction `fn`."""
    import inspect
    kwargs = dict(spec["kwargs"])
    options = {k: kwargs.pop(k)[1] for k in _LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip(fn.arg_names, spec["args"]))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for name, param in zip(fn.arg_names, fn.params):
        if name in values:
            kind, *value = values[name]
        elif param.default is not inspect.Parameter.empty:
            kind, value = "default", [param.default]
        else:
            raise ValueError(f"{spec['kernel']}: no value recorded for argument {name!r}")
        if param.is_constexpr or kind in ("none", "default", "str"):
            signature[name], constexprs[name] = "constexpr", (value[0] if value else None)
        elif kind == "ptr":
            signature[name] = "*" + value[0]
        elif kind == "int":
            signature[name] = "i32" if -2 ** 31 <= value[0] < 2 ** 31 else "i64"
        elif kind == "float":
            signature[name] = "fp32"
        elif kind == "bool":
            signature[name] = "i1"
        else:
            raise ValueError(f"{spec['kernel']}: argument {name!r} of unknown kind {kind!r}")
    return signature, constexprs, options


def compile_spec(spec: dict, arch: int) -> dict:
    """triton.compile of one recorded launch for cuda:<arch>: {"kernel", "ok", "seconds", ...}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    module_name, kernel_name = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module_name), kernel_name)
    signature, constexprs, options = signature_of(fn, spec)
    start = time.perf_counter()
    result = {"kernel": spec["kernel"], "constexprs": constexprs, "options": options,
              "pointers": {k: v for k, v in signature.items() if v.startswith("*")}}
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        result.update(ok="cubin" in compiled.asm, shared_bytes=compiled.metadata.shared)
    except Exception as e:  # reported per kernel: one failure must not hide the others
        result.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", help="JSON list written by capture()")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles run in parallel")
    args = parser.parse_args(argv)
    import triton
    with open(args.specs) as f:
        specs = json.load(f)
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = pool.map(compile_spec, specs, [args.arch] * len(specs))
    for i, (spec, result) in enumerate(zip(specs, results)):
        result["triton"] = triton.__version__
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
        print(f"[{i + 1}/{len(specs)}] {spec['kernel']} {'ok' if result['ok'] else 'FAILED'} "
              f"({result['seconds']} s)", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
