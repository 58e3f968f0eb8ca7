"""Upstream module path of `pid.inference.from_ldm`; forwards to it."""

from pid.inference.from_ldm import main

if __name__ == "__main__":
    raise SystemExit(main())
