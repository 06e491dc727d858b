"""Run-time compilation of the kernel sources to CUBIN with NVRTC, cached on disk.

Needs no GPU and no driver: only the NVRTC shared library, which the pip package ``cuda-toolkit[nvrtc]``
installs and ``cuda.bindings`` finds through ``cuda.pathfinder``. The sources include no CUDA header
(see common.cuh), so no toolkit include directory is needed either.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# The CUDA sources live in the top-level kernels/ folder, reached through the package link cuda/.
SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
HEADERS = ("common.cuh",)
# Module name -> (source file, kernels it defines). The names are what the launcher looks up.
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "decode": (
        "decode.cu",
        tuple(
            f"mbq_decode_{dtype}_n{tokens}_g{group}"
            for dtype in ("f16", "bf16")
            for tokens in (8, 16)
            for group in (128, 32)
        ),
    ),
    "prefill": ("prefill.cu", ("mbq_prefill_f16", "mbq_prefill_bf16")),
    "dequant": ("dequant.cu", ("mbq_dequant_f16", "mbq_dequant_bf16")),
}
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
# No fast-math: the kernels' rounding is part of the accuracy contract (<= 1e-3 relative for fp16).
BASE_OPTIONS = ("--std=c++17", "--device-as-default-execution-space")
CACHE_ENV = "MOBIQUANT_KERNEL_CACHE"
# A real architecture (NVRTC writes no CUBIN for a virtual compute_XY) with the mma.m16n8k16 of sm_80+.
ARCH_PATTERN = re.compile(r"sm_(\d+)a?")
MIN_ARCH = 80


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; ``log`` holds the compiler's full output."""

    def __init__(self, name: str, arch: str, log: str) -> None:
        super().__init__(f"NVRTC failed to compile {name} for {arch}:\n{log}")
        self.name, self.arch, self.log = name, arch, log


class NvrtcUnavailableError(RuntimeError):
    """The NVRTC shared library (or cuda-python, which loads it) could not be loaded."""


class UnsupportedArchError(ValueError):
    """An architecture the kernels cannot be built for: not ``sm_XY[a]`` with XY >= 80."""


def check_arch(arch: str) -> None:
    """Raise ``UnsupportedArchError`` unless ``arch`` is a real architecture of sm_80 or newer."""
    match = ARCH_PATTERN.fullmatch(arch)
    if match is None or int(match.group(1)) < MIN_ARCH:
        raise UnsupportedArchError(
            f"unsupported architecture {arch!r}: expected sm_XY or sm_XYa with XY >= {MIN_ARCH} "
            "(the kernels need sm_80's mma.m16n8k16), e.g. sm_80, sm_90a"
        )


@dataclass(frozen=True)
class CompileResult:
    """One module built for one architecture."""

    arch: str
    kernel: str
    cubin_bytes: int
    log: str
    seconds: float
    cache_hit: bool
    path: str

    def as_dict(self) -> dict[str, object]:
        return {
            "arch": self.arch,
            "kernel": self.kernel,
            "cubin_bytes": self.cubin_bytes,
            "log": self.log,
            "seconds": self.seconds,
            "cache_hit": self.cache_hit,
            "path": self.path,
        }


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path.home() / ".cache" / "mobiquant" / "kernels"


def _nvrtc():  # -> module; imported lazily so that importing mobiquant.kernels never needs cuda-python
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise NvrtcUnavailableError("cuda-python is not installed: pip install '.[cuda]'") from exc

    return nvrtc


def nvrtc_version() -> str:
    nvrtc = _nvrtc()  # first: it turns a missing cuda-python into NvrtcUnavailableError
    from cuda.pathfinder import DynamicLibNotFoundError

    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except DynamicLibNotFoundError as exc:
        raise NvrtcUnavailableError(
            "the NVRTC library was not found; install it with: pip install 'cuda-toolkit[nvrtc]==13.*'"
        ) from exc
    _check(nvrtc, err, "nvrtcVersion")
    return f"{major}.{minor}"


def _check(nvrtc, err, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, message = nvrtc.nvrtcGetErrorString(err)
        raise RuntimeError(f"{what} failed: {message.decode()}")


def read_sources(name: str) -> tuple[str, dict[str, str]]:
    """The module's source text and the headers it may include, by include name."""
    source_file, _ = MODULES[name]
    headers = {header: (SOURCE_DIR / header).read_text() for header in HEADERS}
    return (SOURCE_DIR / source_file).read_text(), headers


def cache_key(source: str, headers: dict[str, str], arch: str, options: tuple[str, ...], version: str) -> str:
    """sha256 over everything that changes the CUBIN: sources, architecture, options and NVRTC version."""
    digest = hashlib.sha256()
    for part in (source, *(f"{k}\0{v}" for k, v in sorted(headers.items())), arch, *options, version):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def compile_source(
    name: str,
    source: str,
    arch: str,
    headers: dict[str, str] | None = None,
    options: tuple[str, ...] = BASE_OPTIONS,
    cache_dir: Path | str | None = None,
) -> tuple[bytes, CompileResult]:
    """CUBIN of ``source`` for ``arch`` (e.g. ``"sm_80"``), from the cache when the key matches."""
    check_arch(arch)
    headers = headers or {}
    version = nvrtc_version()
    key = cache_key(source, headers, arch, options, version)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cubin_path = directory / f"{name}-{arch}-{key[:24]}.cubin"
    log_path = cubin_path.with_suffix(".log")
    start = time.perf_counter()
    cubin = cubin_path.read_bytes() if cubin_path.exists() else b""
    if cubin:  # an empty file (left by an older version) is no CUBIN: build again
        log = log_path.read_text() if log_path.exists() else ""
        return cubin, CompileResult(arch, name, len(cubin), log, time.perf_counter() - start, True, str(cubin_path))

    cubin, log = _nvrtc_compile(name, source, arch, headers, options)
    directory.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so that a concurrent reader never sees a half-written CUBIN.
    for path, data in ((log_path, log.encode()), (cubin_path, cubin)):
        # Unique per process and thread: two threads finishing the same module must not share a file.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return cubin, CompileResult(arch, name, len(cubin), log, time.perf_counter() - start, False, str(cubin_path))


def _nvrtc_compile(
    name: str, source: str, arch: str, headers: dict[str, str], options: tuple[str, ...]
) -> tuple[bytes, str]:
    nvrtc = _nvrtc()
    header_names = sorted(headers)
    err, program = nvrtc.nvrtcCreateProgram(
        source.encode(),
        f"{name}.cu".encode(),
        len(header_names),
        [headers[h].encode() for h in header_names],
        [h.encode() for h in header_names],
    )
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), *(o.encode() for o in options)]
        (compile_err,) = nvrtc.nvrtcCompileProgram(program, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(program)
        _check(nvrtc, err, "nvrtcGetProgramLogSize")
        buffer = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(program, buffer)
        _check(nvrtc, err, "nvrtcGetProgramLog")
        log = buffer.rstrip(b"\0 ").decode(errors="replace")
        if compile_err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(name, arch, log)
        err, size = nvrtc.nvrtcGetCUBINSize(program)
        _check(nvrtc, err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(program, cubin)
        _check(nvrtc, err, "nvrtcGetCUBIN")
        if not cubin.strip(b"\0 "):
            raise KernelCompileError(name, arch, f"{log}\nNVRTC returned no CUBIN for {arch}".lstrip())
        return cubin, log
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def compile_module(name: str, arch: str, cache_dir: Path | str | None = None) -> tuple[bytes, CompileResult]:
    """CUBIN of one of the library's modules (``"decode"`` or ``"prefill"``) for ``arch``."""
    source, headers = read_sources(name)
    return compile_source(name, source, arch, headers, BASE_OPTIONS, cache_dir)


def compile_kernels(
    archs: tuple[str, ...] | list[str] = DEFAULT_ARCHS, cache_dir: Path | str | None = None
) -> list[CompileResult]:
    """Build every module for every architecture (no GPU needed); one result per (arch, module)."""
    for arch in archs:  # refuse a bad architecture before spending time on the good ones
        check_arch(arch)
    return [compile_module(name, arch, cache_dir)[1] for arch in archs for name in MODULES]
