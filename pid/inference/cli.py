"""The command-line front door of both entry points: arguments -> typed `Settings`, help, exit codes.

Two spellings reach the same settings, and may be mixed:

    python -m pid.inference.from_ldm backbone=flux prompt="a cat, (sitting)" save_xt_steps=[24]
    python -m pid.inference.from_ldm --backbone flux --prompt "a cat, (sitting)" --save_xt_steps 24 26

Every option is declared once, in the entry point's YAML (`configs/<entry>.yaml`, and the backbone's file for
`backbone.*` keys): its default, and a comment `# <type> meaning`. Help, type checking and the upstream flag
table are derived from that. Values are taken verbatim: a text value (prompt, path, caption) reaches the program
byte for byte — no Hydra grammar, no interpolation — so commas, quotes, brackets, `=`, `${...}`, backslashes,
leading dashes and non-ASCII text all work. Hydra composes the defaults (the `backbone` group) and stops here:
the rest of the program reads plain Python values.

Exit codes: 0 every item done; 1 some items failed (listed in the summary and in failures.jsonl) or an
unexpected error (one line; `debug=true` for the traceback); 2 bad input before any work; 130 interrupted (Ctrl-C),
143 terminated (SIGTERM, e.g. Slurm preemption). Under torchrun a complete run exits 0 (see `plan_or_run`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pid.config_files import check_config_dir, config_dir
from pid.errors import ConfigError, PiDError
from pid.inference import lifecycle

CONFIG_DIR = config_dir()

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
HELP_WORDS = ("--help", "-h", "help")

# ------------------------------------------------------------------------------------------------------------
# Settings: the parsed command, as plain values with attribute access


class Settings:
    """Plain option values with attribute access (`s.prompt`, `s.backbone.name`, `s.get("pid_batch")`).

    Built once from the command line; nothing downstream parses text again. Values are Python objects (str,
    int, float, bool, list, dict, None); `backbone` is a nested Settings.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        data = {k: Settings(v) if k == "backbone" and isinstance(v, Mapping) else v for k, v in values.items()}
        object.__setattr__(self, "_values", data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self._values[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Settings) else v for k, v in self._values.items()}

    def __repr__(self) -> str:
        return f"Settings({self.to_dict()!r})"


# ------------------------------------------------------------------------------------------------------------
# Options, read from the YAML files with their comments

# `key: value  # <type> meaning`; groups are `# --- name ---` lines.
_OPTION_LINE = re.compile(r"^(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*#\s*<(?P<kind>[^>]+)>\s*(?P<help>.*)$")
_GROUP_LINE = re.compile(r"^#\s*---\s*(?P<name>.+?)\s*---\s*$")
KINDS = ("text", "path", "int", "float", "bool", "size", "ints", "floats", "mapping", "chunk", "choice")


@dataclass(frozen=True)
class Option:
    key: str  # "prompt", or "backbone.repo_path" for a backbone file's option
    kind: str  # one of KINDS
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # the upstream `--flag` spellings that set it


@dataclass(frozen=True)
class EntryPoint:
    """What the front door needs to know about one CLI."""

    name: str  # "from_ldm" | "from_clean"
    # upstream flag -> option key (the number of values follows from the option's type)
    flags: Mapping[str, str]
    # upstream flags accepted for compatibility that change nothing here -> (number of values, why)
    no_effect: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    # the help page's exit-code line
    exit_codes: str = ("0 all items done, 1 some items failed (see failures.jsonl), 2 bad input, 130 interrupted\n"
                       "(Ctrl-C), 143 terminated (SIGTERM); under torchrun a complete run exits 0 (failures in "
                       "failures.jsonl)")


def _read_options(path: Path, prefix: str = "") -> tuple[list[Option], list[str]]:
    """The options of one YAML file, and its leading comment block (the help page's description)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    options, header, group, in_header = [], [], "options", True
    for line in path.read_text(encoding="utf-8").splitlines():
        if in_header and line.startswith("#"):
            header.append(line[2:] if line.startswith("# ") else line[1:])
            continue
        in_header = False
        if match := _GROUP_LINE.match(line):
            group = match["name"]
            continue
        if match := _OPTION_LINE.match(line):
            kind, _, choices = match["kind"].partition(":")
            if kind not in KINDS:
                raise ValueError(f"{path}: option {match['key']} has unknown type <{kind}>")
            options.append(Option(prefix + match["key"], kind, values[match["key"]], match["help"].strip(), group,
                                  tuple(c for c in choices.split("|") if c)))
    return options, header


def _default_backbone(entry: EntryPoint) -> str:
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{entry.name}.yaml")).get("defaults", [])
    return next(d["backbone"] for d in defaults if isinstance(d, dict) and "backbone" in d)


def available_backbones() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))


def entry_options(entry: EntryPoint, backbone: str | None = None) -> tuple[list[Option], list[str]]:
    """Every option of an entry point (with the backbone's `backbone.*` options when one is named)."""
    options, header = _read_options(CONFIG_DIR / f"{entry.name}.yaml")
    # `backbone` is a Hydra config group (configs/backbone/*.yaml), not a plain key of the entry's file.
    group = options[0].group if options else "options"
    what = "the LDM" if entry.name == "from_ldm" else "whose VAE encodes"
    options.insert(0, Option("backbone", "text", _default_backbone(entry), f"{what}: {', '.join(available_backbones())}",
                             group))
    if backbone is not None:
        extra, _ = _read_options(CONFIG_DIR / "backbone" / f"{backbone}.yaml", prefix="backbone.")
        options += extra
    spellings: dict[str, list[str]] = {}
    for flag, key in entry.flags.items():
        spellings.setdefault(key, []).append(flag)
    return [Option(o.key, o.kind, o.default, o.help, o.group, o.choices, tuple(spellings.get(o.key, ())))
            for o in options], header


# ------------------------------------------------------------------------------------------------------------
# Parsing


@dataclass
class Command:
    """A parsed command line: its settings, and whether to only print the plan (`dry_run`)."""

    settings: Settings
    dry_run: bool


@dataclass
class _Raw:
    key: str
    values: list[str]
    spelled: str  # "--flag" or "key="


def _is_option_start(token: str, keys: set[str], entry: EntryPoint) -> bool:
    name = token.split("=", 1)[0]
    if token.startswith("--"):
        return name in entry.flags or name in entry.no_effect or name[2:] in keys or name in ("--dry_run",)
    return "=" in token and (name in keys or name.startswith("backbone.") or name == "dry_run")


def _tokenize(argv: Sequence[str], entry: EntryPoint, kinds: Mapping[str, str]) -> list[_Raw]:
    """Split argv into (key, raw values). Values are never reinterpreted: quotes, commas etc. stay as typed."""
    from loguru import logger

    keys = set(kinds)
    raw: list[_Raw] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            key, eq, value = token.partition("=")
            if not eq:
                raise ConfigError(f"unexpected argument {token!r}: options are key=value or --flag value (see --help)")
            raw.append(_Raw(key.lstrip("+"), [value], f"{key}="))
            continue
        name, eq, inline = token.partition("=")
        if name in entry.no_effect:
            count, why = entry.no_effect[name]
            i += 0 if eq else count
            logger.warning("{} is accepted for compatibility and has no effect here: {}", name, why)
            continue
        if name == "--dry_run":
            raw.append(_Raw("dry_run", [inline if eq else "true"], name))
            continue
        key = entry.flags.get(name) or (name[2:] if name[2:] in keys else None)
        if key is None:
            raise ConfigError(f"unknown flag {name}; see --help for every option and its flag")
        kind = kinds.get(key, "text")
        if eq:
            values = [inline]
        elif kind == "bool":
            # a switch; an explicit true/false may follow
            values = ["true"]
            if i < len(argv) and argv[i].lower() in ("true", "false"):
                values, i = [argv[i]], i + 1
        elif kind in ("ints", "floats") or (kind == "size" and key != "resolution"):
            values = []
            while i < len(argv) and not _is_option_start(argv[i], keys, entry):
                values.append(argv[i])
                i += 1
            if not values:
                raise ConfigError(f"{name} needs one or more values")
        else:
            if i >= len(argv):
                raise ConfigError(f"{name} needs a value")
            values = [argv[i]]  # taken whatever it looks like, so a prompt may start with a dash
            i += 1
            if kind == "size" and i < len(argv) and argv[i].isdigit():
                values.append(argv[i])  # `--resolution 4096 3072`
                i += 1
        raw.append(_Raw(key, values, name))
    return raw


_NULL = ("null", "none", "~")


def _split_numbers(values: list[str]) -> list[str]:
    joined = ",".join(values).strip()
    if joined.startswith("[") and joined.endswith("]"):
        joined = joined[1:-1]
    return [p for p in re.split(r"[,\s]+", joined) if p]


def size_numbers(text: str) -> list[int]:
    """`N`, `W,H`, `WxH`, `W H`, `[W,H]` (quotes tolerated) -> [N] or [W, H] of positive ints; else ValueError."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("[]'\"").lower()) if p]
    numbers = [int(p) for p in parts]
    if len(numbers) not in (1, 2) or any(n <= 0 for n in numbers):
        raise ValueError(text)
    return numbers


def convert_value(option: Option, values: list[str], spelled: str) -> Any:
    """Typed value of an option from the raw strings the user typed (one for key=value)."""
    kind, text = option.kind, " ".join(values)
    what = spelled.rstrip("=")
    if kind == "text":
        return text
    nullable_text = text.strip().lower()
    if nullable_text in _NULL and kind != "text" and (option.default is None or kind in ("path", "chunk")):
        return None
    try:
        if kind == "path":
            return text if text.strip() else None
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "choice":
            if text not in option.choices:
                raise ConfigError(f"{what} must be one of {', '.join(option.choices)}, got {text!r}")
            return text
        if kind == "chunk":
            lowered = text.strip().lower()
            if lowered in ("auto",):
                return "auto"
            if lowered in ("0", "off"):
                return None
            return int(text)
        if kind == "size":
            numbers = size_numbers(" ".join(values))
            return numbers[0] if len(numbers) == 1 else numbers
        if kind == "ints":
            return [int(p) for p in _split_numbers(values)]
        if kind == "floats":
            return [float(p) for p in _split_numbers(values)]
        if kind == "mapping":
            return _parse_mapping(text, what)
    except ConfigError:
        raise
    except ValueError:
        example = {"int": "an integer", "float": "a number", "bool": "true or false",
                   "size": "N, W,H or WxH (e.g. 2048 or 4096,3072)", "ints": "integers (e.g. 24,26)",
                   "floats": "numbers (e.g. 0,0.2)", "chunk": "auto, a number of patches or null",
                   "path": "a path"}[kind]
        raise ConfigError(f"{what} must be {example}, got {text!r}") from None
    raise AssertionError(kind)


def _parse_mapping(text: str, what: str) -> dict[str, Any]:
    """`{a: 1, b: [1, 2]}` (Hydra/YAML flow style) or JSON."""
    text = text.strip()
    if not text or text.lower() in _NULL:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        try:
            value = OverridesParser.create().parse_override(f"x={text}").value()
        except HydraException:
            value = None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping like {{max_sequence_length: 256}}, got {text!r}")
    return value


def _find_backbone(entry: EntryPoint, argv: list[str]) -> str | None:
    """The backbone the command names (last one wins), found before the full parse."""
    found = None
    for i, token in enumerate(argv):
        if token.startswith(("backbone=", "--backbone=")):
            found = token.split("=", 1)[1]
        elif token == "--backbone" and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def _compose_defaults(entry: str, backbone: str) -> dict[str, Any]:
    """The entry point's defaults with the chosen backbone group, composed by Hydra."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = hydra_compose(config_name=entry, overrides=[f"backbone={backbone}"])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def parse_command(entry: EntryPoint, argv: Sequence[str]) -> Command:
    """Parse a command line into settings; every problem is a one-line ConfigError."""
    check_config_dir(CONFIG_DIR, entry.name)
    backbone = _find_backbone(entry, list(argv)) or _default_backbone(entry)
    known = available_backbones()
    if backbone not in known:
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(known)}")
    # the backbone's own options (dinov2/siglip) decide how many values their flags take
    options = {o.key: o for o in entry_options(entry, backbone)[0]}
    raw = _tokenize(list(argv), entry, {key: o.kind for key, o in options.items()})
    values = _compose_defaults(entry.name, backbone)
    values["backbone"]["name"] = backbone
    dry_run = False
    upstream_ldm = values["backbone"].get("kind", "diffusers") != "diffusers"
    for item in raw:
        if upstream_ldm and item.spelled == "--resolution" and "ldm_resolution" in options:
            item.key = "ldm_resolution"  # upstream's --resolution for dinov2/siglip is the LDM's size
        if item.key == "backbone":
            continue
        if item.key == "dry_run":
            dry_run = convert_value(Option("dry_run", "bool", False, "", ""), item.values, item.spelled)
            continue
        option = options.get(item.key)
        if option is None:
            if item.key.startswith("backbone."):
                own = sorted(k.removeprefix("backbone.") for k in options if k.startswith("backbone."))
                hint = f"backbone {backbone} has: {', '.join(own)}" if own else f"backbone {backbone} has none"
                raise ConfigError(f"unknown option {item.key}; {hint}")
            raise ConfigError(f"unknown option {item.spelled.rstrip('=')}; see --help for every option")
        value = convert_value(option, item.values, item.spelled)
        target = values["backbone"] if item.key.startswith("backbone.") else values
        target[item.key.removeprefix("backbone.")] = value
    return Command(Settings(values), bool(dry_run))


# ------------------------------------------------------------------------------------------------------------
# Help


def _show_default(option: Option) -> str:
    value = option.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False) if (not value or " " in value) else value
    return json.dumps(value)


def help_text(entry: EntryPoint, module: str) -> str:
    """The usage page, generated from the YAML files' comments and the flag table."""
    options, header = entry_options(entry)
    width = 100
    lines = [f"usage: python -m {module} [key=value ...] [--flag value ...] [--dry_run] [--help]", ""]
    lines += header + [""]
    groups: dict[str, list[Option]] = {}
    for option in options:
        groups.setdefault(option.group, []).append(option)
    for name, members in groups.items():
        lines.append(f"{name}:")
        for option in members:
            kind = f"<{option.kind}>" if option.kind != "choice" else "{" + "|".join(option.choices) + "}"
            head = f"  {option.key}={kind}"
            meta = f"default {_show_default(option)}"
            if option.flags:
                meta += "; upstream " + ", ".join(option.flags)
            lines.append(head)
            lines += textwrap.wrap(f"{option.help} ({meta})", width, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
        lines.append("")
    rae = [b for b in available_backbones() if _read_options(CONFIG_DIR / "backbone" / f"{b}.yaml")[0]]
    if rae and entry.name == "from_ldm":
        lines.append(f"backbone options (backbone.KEY=value; see --help with backbone={rae[0]}): "
                     f"{', '.join(rae)} take their own keys, listed in docs/rae.md")
        lines.append("")
    if entry.no_effect:
        lines.append("accepted upstream flags that change nothing here: " + ", ".join(sorted(entry.no_effect)))
        lines.append("")
    lines += [f"exit codes: {entry.exit_codes}",
              "--dry_run (or dry_run=true): resolve everything, print the plan as one JSON object, load nothing"]
    return "\n".join(lines) + "\n"


def backbone_help(entry: EntryPoint, backbone: str) -> str:
    options = [o for o in entry_options(entry, backbone)[0] if o.key.startswith("backbone.")]
    if not options:
        return ""
    lines = [f"options of backbone {backbone}:"]
    for option in options:
        lines.append(f"  {option.key}=<{option.kind}>")
        lines += textwrap.wrap(f"{option.help} (default {_show_default(option)})", 100, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def wants_help(entry: EntryPoint, argv: Sequence[str]) -> bool:
    """`--help`, `-h` or `help` where an option could stand (not as the value of a flag such as --prompt)."""
    options, _ = entry_options(entry)
    kinds = {o.key: o.kind for o in options}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in HELP_WORDS:
            return True
        name = token.split("=", 1)[0]
        key = entry.flags.get(name) or (name[2:] if name.startswith("--") and name[2:] in kinds else None)
        if "=" not in token and key is not None and kinds.get(key) not in ("bool", "ints", "floats"):
            i += 1  # its value, taken verbatim
    return False


# ------------------------------------------------------------------------------------------------------------
# Checks the trainer shares


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """The output folder must be a folder, or creatable, and writable; checked before any model loads."""
    from pid.inference.validate import check_writable_folder

    folder = Path(path).expanduser()
    check_writable_folder(folder, "output_dir")
    return folder


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from torchrun's environment (no process group needed)."""
    from pid.inference.distributed import dist_env

    env = dist_env()
    return env.rank, env.world_size


# ------------------------------------------------------------------------------------------------------------
# Running an entry point


def run_cli(entry: EntryPoint, module: str, main: Callable[[Command], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Parse, print help or run; one line and an exit code for every way a run can end (see the module doc).

    argv=None means the CLI owns the process (`python -m ...`, the console scripts): it then sets up the log
    sink and ignores stop signals once the run is over, so the exit code is always its own. Called with argv
    (tests, embedding), it leaves the caller's log sinks and signal handlers as they were.
    """
    from loguru import logger

    owns_process = argv is None
    logger.enable("pid")  # a CLI shows pid's logs; the library is quiet again afterwards (main() in-process)
    args = list(sys.argv[1:] if argv is None else argv)
    stop = lifecycle.StopState()
    try:
        with lifecycle.stop_signals(stop, restore=not owns_process):
            code = _run_entry(entry, module, main, args, owns_process)
    except KeyboardInterrupt as exc:  # a stop signal that surfaced outside _run_entry's own handler
        code = _interrupted(exc)
    finally:
        logger.disable("pid")
    if stop.exit_code is not None:  # even if something swallowed the interrupt: the run was stopped
        code = stop.exit_code
    return code


def _interrupted(exc: BaseException) -> int:
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    print(f"interrupted ({name}); finished outputs are kept and a re-run resumes", file=sys.stderr, flush=True)
    return lifecycle.exit_code_for_signal(signum)


def _run_entry(entry: EntryPoint, module: str, main: Callable[[Command], int | None], args: list[str],
               owns_process: bool = False) -> int:
    debug = False
    try:
        if wants_help(entry, args):
            backbone = next((a.split("=", 1)[1] for a in args if a.startswith("backbone=")), None)
            text = help_text(entry, module)
            if backbone in available_backbones():
                text += "\n" + backbone_help(entry, backbone)
            sys.stdout.write(text)
            return EXIT_OK
        command = parse_command(entry, args)
        debug = bool(command.settings.get("debug", False))
        if owns_process:
            lifecycle.configure_cli_logging(debug)
        code = main(command)
    except PiDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:  # nobody anticipated it: one line, the traceback only on request
        if debug:
            traceback.print_exc()
        print(lifecycle.unexpected_error_line(exc), file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return EXIT_OK if code is None else int(code)


def plan_or_run(command: Command, plan_run: Callable[[Settings], Any], run: Callable[..., dict[str, Any]]) -> int:
    """Resolve the command into its plan; print it (`--dry_run`) or run it. The exit code of the run.

    A run that fails to start (or is stopped before any output) leaves no folder it created. Under torchrun
    (WORLD_SIZE > 1) a complete run exits 0 on every rank even when items failed: any non-zero worker exit
    makes torchrun print a ChildFailedError traceback as if the job had crashed. Rank 0 says how many items
    failed, and they are in failures.jsonl and summary.json's `failed`.
    """
    from pid.hub import go_offline_if_unreachable
    from pid.inference import distributed as dist

    plan = plan_run(command.settings)
    rank, world = rank_and_world()
    if command.dry_run:
        print_plan(plan.describe(rank, world))
        return EXIT_OK
    go_offline_if_unreachable()  # once, before the first download: no per-file retries without a network
    lifecycle.quiet_libraries_for_run()
    created = lifecycle.first_missing(plan.out_dir)
    try:
        code = int(run(command.settings, plan=plan).get("exit_code", EXIT_OK))
    except BaseException:
        if created is not None:
            lifecycle.remove_empty_tree(created)
        raise
    finally:
        dist.cleanup()
    if world > 1 and code == EXIT_ITEMS_FAILED:
        if rank == 0:
            print("some items failed (listed above, in failures.jsonl and summary.json); exit status 0 under "
                  "torchrun, which reports any non-zero rank as a crash", file=sys.stderr)
        return EXIT_OK
    return code


def print_plan(plan: Mapping[str, Any]) -> None:
    """The dry run's single JSON object on stdout."""
    from pid.inference.io import to_json

    sys.stdout.write(to_json(plan) + "\n")
    sys.stdout.flush()
