"""Forwarders for the upstream module paths `pid._src.inference.from_ldm` / `from_clean` (see pid/_src)."""
