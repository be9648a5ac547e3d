"""`pyrajax-convert SRC DST [--dtype bfloat16|float16|float32] [--force]`."""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert import DTYPES, SUPPORTED, ConversionError, convert


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyrajax-convert",
                                 description=f"Convert a LLaMA checkpoint into a pyrajax checkpoint. SRC is {SUPPORTED}.")
    ap.add_argument("src", metavar="SRC")
    ap.add_argument("dst", metavar="DST", help="directory to create (config.json, params/, tokenizer/)")
    ap.add_argument("--dtype", default="bfloat16", help=f"one of {', '.join(DTYPES)} (default bfloat16)")
    ap.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)
    try:
        dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force)
    except ConversionError as e:
        print(f"pyrajax-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
