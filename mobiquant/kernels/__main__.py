"""``python -m mobiquant.kernels compile [--arch sm_80 ...] [--cache-dir DIR] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

from ._compile import (
    DEFAULT_ARCHS,
    CompileResult,
    KernelCompileError,
    NvrtcUnavailableError,
    UnsupportedArchError,
    compile_kernels,
)


def format_table(results: list[CompileResult]) -> str:
    """The build report as an aligned text table (arch, kernel, bytes, seconds, cache)."""
    rows = [("arch", "kernel", "bytes", "seconds", "cache")]
    rows += [
        (r.arch, r.kernel, str(r.cubin_bytes), f"{r.seconds:.2f}", "hit" if r.cache_hit else "miss") for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobiquant.kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("compile", help="build the CUBINs with NVRTC (no GPU needed)")
    build.add_argument(
        "--arch", action="append", help=f"target, e.g. sm_80 (repeatable; default: {' '.join(DEFAULT_ARCHS)})"
    )
    build.add_argument(
        "--cache-dir", help="CUBIN cache (default: $MOBIQUANT_KERNEL_CACHE or ~/.cache/mobiquant/kernels)"
    )
    build.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        results = compile_kernels(tuple(args.arch or DEFAULT_ARCHS), args.cache_dir)
    except KernelCompileError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (NvrtcUnavailableError, UnsupportedArchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps([r.as_dict() for r in results], indent=2) if args.json else format_table(results))
    if not args.json:
        # NVRTC's warnings go to stderr so that stdout stays the table; --json carries them in "log".
        for result in results:
            if result.log:
                print(f"NVRTC log for {result.kernel} ({result.arch}):\n{result.log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
