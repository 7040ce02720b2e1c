"""Build vpt_fast: the package layout and the C++/CUDA extension `vpt_fast._C` (FlashAttention style).

Project metadata, dependencies and tool settings live in pyproject.toml. Supported install (README.md):

    pip install torch==2.14.1 torchvision==0.29.1 "setuptools>=64" wheel ninja
    pip install --no-build-isolation -e ".[test]"

`--no-build-isolation` builds the extension against the torch already installed, with the build
tools already installed (pyproject.toml's build requirements: setuptools, wheel, ninja). torch is
not a build requirement, so an isolated build environment would have no torch and the build fails.

Package layout: kernels/ (the @triton.jit kernels) stays at the top level of the checkout and
installs as `vpt_fast.kernels` (`package_dir` below). An editable install maps it through
setuptools' editable finder; a plain source checkout on PYTHONPATH cannot import
`vpt_fast.kernels` (the triton backend is then unavailable): install the package instead.

The extension `vpt_fast._C` (csrc/):
- CUDAExtension (ninja), CPU and CUDA kernels, when torch is a CUDA build and a CUDA toolkit is found.
- CppExtension (CPU kernels only) when torch is a CPU build, or with VPT_FAST_FORCE_CPU_EXT=1.
- nothing with VPT_FAST_NO_EXT=1 (every backend but `cuda` works without it).
Anything else fails the install with a message saying why and how to skip the extension: torch not
importable at build time, a CUDA torch without a CUDA toolkit, a compile or link error. There is no
silent fallback to a lesser build.

Environment:
  VPT_FAST_NO_EXT=1        skip the extension
  VPT_FAST_FORCE_CPU_EXT=1 build the CPU-only extension even with a CUDA torch and toolkit
  TORCH_CUDA_ARCH_LIST     CUDA architectures, default "8.0;9.0a" (sm_80 and sm_90a cubins)
  CUDA_HOME / CUDA_PATH    toolkit root; otherwise found from `nvcc` on PATH (wrapper scripts that
                           `exec` the real nvcc are resolved) or standard install locations
  MAX_JOBS                 parallel compile jobs (ninja); NVCC_THREADS: nvcc --threads (default 2)
"""
import glob
import os
import re
import shutil
import sys
from typing import NoReturn

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;9.0a"


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(root):
    """A CUDA toolkit root: bin/nvcc is a real nvcc binary next to include/cuda_runtime.h."""
    if not root:
        return False
    nvcc = os.path.join(root, "bin", "nvcc")
    return (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) and not _is_script(nvcc)
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")))


def _is_script(path):
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def _resolve_nvcc(path, depth=0):
    """Follow symlinks and `exec /path/to/nvcc` wrapper scripts to the real nvcc binary."""
    path = os.path.realpath(path)
    if depth > 4 or not _is_script(path):
        return path
    try:
        with open(path, errors="ignore") as f:
            text = f.read(65536)
    except OSError:
        return None
    for m in re.finditer(r"""(?:^|[\s;'"])(/[^\s'"]*/nvcc)(?=[\s'"]|$)""", text):
        target = m.group(1)
        if os.path.isfile(target) and os.path.realpath(target) != path:
            return _resolve_nvcc(target, depth + 1)
    return None


def find_cuda_home():
    """The CUDA toolkit root, or None. Never raises."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _resolve_nvcc(nvcc)
        if real:
            root = os.path.dirname(os.path.dirname(real))
            if _is_toolkit(root):
                return root
    candidates = ["/usr/local/cuda"]
    try:
        candidates += sorted((os.path.join("/usr/local", n) for n in os.listdir("/usr/local")
                              if n.startswith("cuda-")), reverse=True)
    except OSError:
        pass
    candidates += ["/opt/cuda", "/usr/lib/cuda"]
    for root in candidates:
        if _is_toolkit(root):
            return os.path.realpath(root)
    return None


def _gencode_flags(arch_list):
    """"8.0;9.0a" -> ['-gencode=arch=compute_80,code=sm_80', '-gencode=arch=compute_90a,code=sm_90a'].
    "+PTX" also embeds PTX for the last listed architecture."""
    flags, archs = [], []
    for item in re.split(r"[;,\s]+", arch_list.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item[:-4] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", item)
        if not m:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot parse architecture {item!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        archs.append(f"sm_{num}")
    if not flags:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty")
    return flags, archs


SKIP_HINT = ("To install without the extension (every backend but `cuda` works): "
             "VPT_FAST_NO_EXT=1 pip install --no-build-isolation -e .")


def _fail(reason: str) -> NoReturn:
    """Stop the install with `reason` and how to skip the extension."""
    raise SystemExit(f"\nvpt_fast: cannot build the C++/CUDA extension vpt_fast._C: {reason}\n{SKIP_HINT}\n")


def build_extensions():
    """(ext_modules, cmdclass) for vpt_fast._C, or ([], {}) with VPT_FAST_NO_EXT=1."""
    if _env_flag("VPT_FAST_NO_EXT"):
        print("vpt_fast: VPT_FAST_NO_EXT=1, not building the C++/CUDA extension", file=sys.stderr)
        return [], {}
    force_cpu = _env_flag("VPT_FAST_FORCE_CPU_EXT")
    cuda_home = None if force_cpu else find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["CUDA_PATH"] = cuda_home
        os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as exc:
        _fail(f"torch is not importable at build time ({exc}).\n"
              "Install torch first, then build against it with pip's --no-build-isolation "
              "(an isolated build environment has no torch):\n"
              "  pip install torch && pip install --no-build-isolation -e .")

    if torch.version.cuda is not None and not cuda_home and not force_cpu:
        _fail(f"torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}) but no CUDA toolkit "
              "was found (looked at CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda*, /opt/cuda, "
              "/usr/lib/cuda).\nSet CUDA_HOME to the toolkit root to build the CUDA kernels, or build the "
              "CPU-only extension (the `cuda` backend then runs on CPU tensors only) with "
              "VPT_FAST_FORCE_CPU_EXT=1.")

    csrc = "csrc"
    sources = [f"{csrc}/bindings.cpp", f"{csrc}/attention/attention_cpu.cpp"]
    cuda_sources = sorted(glob.glob(f"{csrc}/**/*.cu", recursive=True))
    cxx = ["-O3"]
    define_macros = []
    if cuda_home and torch.version.cuda is None:
        print(f"vpt_fast: torch {torch.__version__} is a CPU build; building the CPU-only extension",
              file=sys.stderr)
    if torch.version.cuda is not None and cuda_home:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
        gencode, archs = _gencode_flags(arch_list)
        # Our own -gencode flags are authoritative; keep torch from adding its arch flags.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += cuda_sources
        define_macros += [("VPT_FAST_WITH_CUDA", "1"), ("VPT_FAST_ARCHS", f'"{" ".join(archs)}"')]
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + gencode
        print(f"vpt_fast: building the CUDA extension with {cuda_home} for {' '.join(archs)}", file=sys.stderr)
        ext = ce.CUDAExtension("vpt_fast._C", sources, define_macros=define_macros,
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    else:
        print("vpt_fast: building the CPU-only extension", file=sys.stderr)
        define_macros += [("VPT_FAST_ARCHS", '""')]
        ext = ce.CppExtension("vpt_fast._C", sources, define_macros=define_macros,
                              extra_compile_args={"cxx": cxx})

    class BuildExtension(ce.BuildExtension):
        """torch's BuildExtension (ninja); a failed compile or link ends with how to skip it."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:  # the compiler's own output is printed above
                _fail(f"{type(exc).__name__}: {exc} (compiler output above).")

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extensions()

setup(
    # Metadata: pyproject.toml. kernels/ installs as vpt_fast.kernels (see the docstring).
    packages=find_packages(include=["vpt_fast", "vpt_fast.*"]) + ["vpt_fast.kernels"],
    package_dir={"vpt_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
