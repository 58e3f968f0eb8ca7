"""Upstream module path of `pid.inference.from_clean`; forwards to it."""

from pid.inference.from_clean import main

if __name__ == "__main__":
    raise SystemExit(main())
