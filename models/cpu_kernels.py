"""Gorgon's C++ kernels for x86-64 CPUs with AVX2 and FMA (`models/csrc/`).

- `panel_linear`: fp32 linear layers over weights laid out in 16-column panels
  (models/packed_linear.py);
- `q4_int8_linear`, `q8_int8_linear` (AVX-512 VNNI): those weights times activations
  rounded to 8 bits, in integer arithmetic (--int8-linear);
- `tree_attention`: paged attention of decode and tree-verification queries, read in place
  from the KV cache (models/cpu_attention.py);
- `rms_norm`, `rotary_`, `silu_mul`, `write_kv`: a layer's small operations in one call
  each (models/llama.py, models/cpu_attention.py); `argmax_rows`: greedy tokens
  (server/sampler.py);
- `CpuDecoder`: all decoder layers of a decode or tree step in one call, chaining the
  kernels above from C++ (models/cpu_decoder.py).

All compute each row (each query) on its own, in an order that does not depend on the
other rows of the step, so a token verified in a speculative tree gets the bits it gets when
decoded alone. They are compiled once with torch's C++ extension builder (the system's C++
compiler and ninja; `make install` does it ahead, about a minute) and cached under
`~/.cache/torch_extensions` (or TORCH_EXTENSIONS_DIR). GORGON_CPU_KERNELS picks: `auto`
(the default: use them where they run, else fall back with a warning), `on` (an error if
they cannot run) or `off`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

logger = logging.getLogger("gorgon.cpu_kernels")
_CSRC = Path(__file__).parent / "csrc"
SOURCES = ("panel_linear.cpp", "int8_linear.cpp", "layer_ops.cpp", "tree_attention.cpp", "cpu_decoder.cpp",
           "cpu_heads.cpp", "bindings.cpp")
HEADERS = ("panels.h", "simd.h", "kernels.h", "linear_spec.h")
_NAME = "gorgon_cpu_kernels"


@contextlib.contextmanager
def _exclusive_build(build_dir: Path):
    """Held around torch's build of the kernels.

    torch marks a build with a `lock` file that a killed build leaves behind (a server stopped
    during its first start, a machine imaged mid-build), and every later build waits on it
    forever. Every Gorgon build first takes an flock on a file beside it, which the OS drops when
    its holder exits or dies: whoever holds that knows no live build holds torch's lock, so a
    leftover one is removed.
    """
    import fcntl
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "gorgon.flock", "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX)   # waits for a live build in another process
            locked = True
        except OSError as e:   # a file system without flock (some NFS, FUSE): torch's lock alone
            logger.warning("cannot lock %s (%s): a lock left by a killed build would hang this one", held.name, e)
            locked = False
        leftover = build_dir / "lock"
        if locked and leftover.exists():
            logger.warning("removing %s, left by a build that did not finish", leftover)
            leftover.unlink(missing_ok=True)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(held, fcntl.LOCK_UN)


def build(name: str = _NAME, csrc: Path = _CSRC, sources: tuple[str, ...] = SOURCES,
          headers: tuple[str, ...] = HEADERS):
    """Compile the kernels' sources in csrc (or load their cached build) as module `name`
    (benchmarks.kernels_ab builds another revision's beside these, with its own file list)."""
    from torch.utils.cpp_extension import _get_build_directory, load
    # -fopenmp compiles ATen's parallel_for into OpenMP regions without linking an
    # OpenMP runtime of our own: they run on the one torch has loaded (its thread pool);
    # -ffp-contract=off: a product then a sum stays two roundings where the code says so
    # (the 4-bit panels' dequantization must match GGUF's to the bit)
    # torch rebuilds when a source or a flag changes, not a header: the headers' hash is a flag
    digest = hashlib.sha256(b"".join((csrc / h).read_bytes() for h in headers)).hexdigest()[:16]
    with _exclusive_build(Path(_get_build_directory(name, verbose=False))):
        return load(name, [str(csrc / s) for s in sources],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off",
                                  f"-DGORGON_HEADERS={digest}"])


@functools.cache
def cpu_kernels():
    """The compiled kernel module, or None where the kernels cannot run or be built."""
    choice = os.environ.get("GORGON_CPU_KERNELS", "auto")
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"GORGON_CPU_KERNELS must be auto, on or off, not {choice!r}")
    if choice == "off":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        if choice == "on":
            raise RuntimeError("GORGON_CPU_KERNELS=on needs an x86-64 CPU with AVX2 and FMA")
        return None
    bin_dir = os.path.dirname(sys.executable)   # pip's ninja sits beside the interpreter
    if shutil.which("ninja") is None and os.path.exists(os.path.join(bin_dir, "ninja")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        logger.info("loading Gorgon's CPU kernels (compiled on first use, about a minute)")
        return build()
    except Exception as e:  # no compiler, no ninja, a read-only cache...
        if choice == "on":
            raise
        logger.warning("Gorgon's CPU kernels could not be built (%s); using oneDNN linear layers and "
                       "PyTorch attention", e)
        return None


if __name__ == "__main__":  # `python -m models.cpu_kernels`: build them now (make install does)
    logging.basicConfig(level=logging.INFO)
    print("Gorgon's CPU kernels:", "built" if cpu_kernels() is not None else "not available here")
