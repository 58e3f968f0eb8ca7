"""The upstream module path (`python -m pid._src.inference.from_ldm ...`), kept so the upstream README's commands
run unchanged. Everything here forwards to `pid.inference`; there is no logic of its own."""
