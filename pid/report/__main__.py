"""python -m pid.report RUN_DIR [RUN_DIR ...] [-o OUT.html]

One run folder (from_ldm, from_clean or pid.train): rebuild its report.html (or write it to -o). Several: a side-by-side comparison of the items
they have in common (default: compare.html in the folder that holds the runs,
else in the current folder).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pid.errors import PiDError
from pid.report import compare_runs, write_report
from pid.report.previews import DEFAULT_MAX_SIDE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pid.report",
        description="Build the HTML report of a PiD run folder, or compare several runs side by side.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s): <output_dir>/<run tag>")
    parser.add_argument("-o", "--output", metavar="OUT.html", help="where to write the page")
    parser.add_argument("--preview-size", type=int, default=DEFAULT_MAX_SIDE, metavar="PX",
                        help=f"longest side of the JPEG previews (default {DEFAULT_MAX_SIDE})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.preview_size < 16:
            raise PiDError(f"--preview-size must be at least 16 px, got {args.preview_size}")
        if len(args.run_dirs) == 1:
            out = write_report(args.run_dirs[0], args.output, preview_max_side=args.preview_size)
        else:
            parents = {Path(d).resolve().parent for d in args.run_dirs}
            default = (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare.html"
            out = compare_runs(args.run_dirs, args.output or default, preview_max_side=args.preview_size)
    except PiDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the output folder is not writable
        print(f"error: cannot write the report ({exc}): pass -o OUT.html to write it somewhere writable", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
