"""How a CLI run starts, reports failures and stops: log sinks, stop signals, failure lines, leftovers.

Shared by both entry points through `pid.inference.cli.run_cli` / `plan_or_run`:

- Logging: when the CLI owns the process, one stderr sink at INFO (DEBUG with `debug=true`), never with
  loguru's `diagnose` (it prints local variable values — prompts, tokens — inside tracebacks); diffusers /
  transformers chatter and loading bars off unless `debug=true` (without importing them before a run starts).
- A failed item is one line (`report_item_failure`); its traceback only with `debug=true`.
- SIGINT and SIGTERM (Ctrl-C, Slurm preemption, torchrun stopping its workers) raise `Interrupted` once;
  a second signal while stopping is ignored, so cleanup cannot be cut short. Exit code 128 + signal:
  130 (SIGINT), 143 (SIGTERM). A signal ignored by whoever started us (`nohup`, `cmd &` in a script)
  stays ignored.
- A start that fails leaves no empty run folder behind (`remove_empty_tree`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code_for_signal(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so code that already handles Ctrl-C handles SIGTERM too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


@dataclass
class StopState:
    signum: int | None = None  # the first stop signal received, if any

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else exit_code_for_signal(self.signum)


@contextmanager
def stop_signals(state: StopState, restore: bool = True) -> Iterator[StopState]:
    """SIGINT / SIGTERM raise `Interrupted` once inside the block; `state.signum` remembers which.

    After the first, both signals are ignored, so the cleanup that follows cannot be cut short. After the
    block they are restored (restore=True), or stay ignored (restore=False: the CLI owns the process and is
    about to exit). Ignored, not handled: at interpreter shutdown Python resets Python-level handlers to the
    default action, and a signal arriving then would kill the process (-2 / -15 instead of 130 / 143).
    """
    if threading.current_thread() is not threading.main_thread():
        yield state  # signal handlers can only be set from the main thread
        return
    previous = {}

    def ignore_from_now_on() -> None:
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)

    def on_signal(signum: int, frame: object) -> None:
        if state.signum is not None:
            return
        state.signum = signum
        ignore_from_now_on()
        raise Interrupted(signum)

    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue  # whoever started us asked for this signal to be ignored (nohup, `cmd &`); respect it
        previous[signum] = current
        signal.signal(signum, on_signal)
    try:
        yield state
    finally:
        if restore:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        else:
            ignore_from_now_on()


# ------------------------------------------------------------------------------------------------------------
# Logging


# Whether this process's CLI asked for quiet model libraries (set by configure_cli_logging).
_QUIET_LIBRARIES = False
_VERBOSITY_VARIABLES = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")


def configure_cli_logging(debug: bool) -> None:
    """The process's log output for a CLI run: replaces loguru's sinks (call only when the CLI owns the
    process) and quiets the libraries that load models. Those are not imported here (diffusers' utilities
    pull in torch._dynamo: a second of every dry run and bad-input error): their verbosity variables, read when
    they are imported, say errors only, and `quiet_libraries_for_run()` finishes the job once a run starts."""
    global _QUIET_LIBRARIES
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if debug else "INFO", backtrace=debug, diagnose=False)
    _QUIET_LIBRARIES = not debug
    if not debug:
        for name in _VERBOSITY_VARIABLES:
            os.environ[name] = "error"
        if "diffusers" in sys.modules or "transformers" in sys.modules:
            quiet_model_libraries()


def quiet_libraries_for_run() -> None:
    """At the start of a run (after the plan, which a dry run prints and stops at): the model libraries' loading
    bars off too, when the CLI asked for quiet libraries."""
    if _QUIET_LIBRARIES:
        quiet_model_libraries()


def quiet_model_libraries() -> None:
    """diffusers / transformers / huggingface_hub: errors only, and no model-loading bars (their notes about
    using the offline cache and loading weights are noise in a batch log; `debug=true` keeps them). The hub's
    download bars stay: a multi-GB download should show progress."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    for name in ("diffusers", "transformers"):
        try:
            module = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        module.set_verbosity_error()
        module.disable_progress_bar()


def report_item_failure(what: str, exc: BaseException, debug: bool = False) -> str:
    """Log one failed item as one line (`<what>: <reason>`); the traceback only with debug. Returns the reason
    (the text for failures.jsonl and the summary)."""
    from pid.inference.runs import describe_failure

    reason = describe_failure(exc)
    logger.opt(depth=1).error("{}: {}", what, reason)
    if debug:
        logger.opt(depth=1, exception=exc).debug("{} failed; traceback follows", what)
    return reason


def unexpected_error_line(exc: BaseException) -> str:
    """One line for an error nobody anticipated (the traceback goes with debug=true)."""
    text = str(exc).strip().splitlines()
    detail = f": {text[0]}" if text else ""
    return f"error: unexpected {type(exc).__name__}{detail} (run again with debug=true for the traceback)"


# ------------------------------------------------------------------------------------------------------------
# Leftovers of a failed start


def first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet (what creating `path` would add), or None."""
    path = Path(path).absolute()
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def remove_empty_tree(top: Path) -> bool:
    """Remove `top` if it holds folders only (no file anywhere below); True when it is gone. Bottom-up rmdir,
    so a file another process writes meanwhile is never deleted."""
    if not top.is_dir():
        return False
    for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(folder)
        except OSError:
            return False
    return not top.exists()
