"""Hugging Face hub access in one place: token, revision, offline state and one-line errors.

Every download in pid (nvidia/PiD files, the LDM pipelines, Gemma-2, the RAE encoders) goes through
`huggingface_hub` (directly or via diffusers / transformers `from_pretrained`). Their failures are
turned into one line that names the repo, the file and the fix:

    with hub_errors("nvidia/PiD", "checkpoints/ae.safetensors"):
        path = hf_hub_download("nvidia/PiD", "checkpoints/ae.safetensors")

    gated repo            -> HubGatedError: the licence URL and `hf auth login`
    file not in the repo  -> HubFileMissingError: the file and the repo
    repo missing/private  -> HubRepoNotFoundError
    revision missing      -> HubRevisionNotFoundError
    offline / no network  -> HubOfflineError: the exact `hf download ...` command

Without a network the hub libraries retry every file five times (about 23 s each) before failing;
`go_offline_if_unreachable()` checks once, at the start of a CLI run, and switches the process to the
local cache (HF_HUB_OFFLINE) so a missing file fails at once, in one line, with its download command.

All are `pid.errors.CheckpointNotFoundError`s, so existing handlers keep working. The token is always
`huggingface_hub.get_token()` (HF_TOKEN, then the `hf auth login` token file): nothing here reads the
environment by hand.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pid.errors import CheckpointNotFoundError

HUB_URL = "https://huggingface.co"


class HubAccessError(CheckpointNotFoundError):
    """A file or repo on the Hugging Face hub could not be had; the message says why and what to do."""


class HubGatedError(HubAccessError):
    """The repo is gated and this token (or no token) has not been granted access."""


class HubFileMissingError(HubAccessError):
    """The repo exists but has no such file (at that revision)."""


class HubRepoNotFoundError(HubAccessError):
    """No such repo, or it is private and the token cannot see it."""


class HubRevisionNotFoundError(HubAccessError):
    """No such branch, tag or commit in the repo."""


class HubOfflineError(HubAccessError):
    """Not in the local cache, and the hub is unreachable or HF_HUB_OFFLINE is set."""


def hub_token() -> str | None:
    """The token huggingface_hub itself would send (HF_TOKEN, then `hf auth login`), or None."""
    from huggingface_hub import get_token

    return get_token()


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE is on (read now, so a change after import counts)."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# The hub host this process found unreachable (and so switched to offline mode), if any.
_UNREACHABLE_HOST: str | None = None
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _hub_address() -> tuple[str, int]:
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT) opens within `timeout` seconds."""
    try:
        with socket.create_connection(_hub_address(), timeout=timeout):
            return True
    except OSError:  # no route, refused, DNS failure, timeout
        return False


def hub_may_answer(timeout: float = 3.0) -> bool:
    """Whether asking the hub can work: a proxy is set (a direct connection says nothing there) or the endpoint
    accepts a TCP connection within `timeout` seconds."""
    return any(os.environ.get(name) for name in _PROXY_VARIABLES) or hub_reachable(timeout)


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """True when this process works from the local cache only: HF_HUB_OFFLINE was set, or the hub cannot be
    reached now, in which case offline mode is switched on for the rest of the process (so no library retries
    each file). Not checked behind a proxy (a direct connection says nothing there)."""
    global _UNREACHABLE_HOST
    if is_offline():
        return True
    if hub_may_answer(timeout):
        return False
    from huggingface_hub import constants
    from loguru import logger

    host, _ = _hub_address()
    _UNREACHABLE_HOST = host
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub, transformers and diffusers
    logger.debug("{} cannot be reached: using files already on this machine only", host)
    return True


def offline_reason() -> str:
    """Why the hub is not asked: in the words of a one-line error ("... and <reason>; download it with ...")."""
    if _UNREACHABLE_HOST is not None:
        return f"the Hugging Face hub ({_UNREACHABLE_HOST}) cannot be reached"
    return "HF_HUB_OFFLINE is set" if is_offline() else "the Hugging Face hub cannot be reached"


def download_command(
    repo: str, path: str | None = None, revision: str | None = None, local_dir: str | None = None
) -> str:
    """The `hf download` command that fetches `path` (a file or a folder; None: the whole repo)."""
    parts = ["hf download", repo]
    if path:
        path = path.strip("/")
        # A folder (no suffix in its last part) is fetched with --include.
        parts.append(path if Path(path).suffix else f'--include "{path}/*"')
    if revision:
        parts.append(f"--revision {revision}")
    if local_dir:
        parts.append(f"--local-dir {local_dir}")
    return " ".join(parts)


def _hub_error_classes() -> dict[str, type[BaseException]]:
    from huggingface_hub import errors

    return {
        "gated": errors.GatedRepoError,
        "revision": errors.RevisionNotFoundError,
        "repo": errors.RepositoryNotFoundError,
        "local": errors.LocalEntryNotFoundError,
        "entry": errors.EntryNotFoundError,
        "offline": errors.OfflineModeIsEnabled,
        "validation": errors.HFValidationError,
    }


def _network_error_classes() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                classes.append(cls)
    return tuple(classes)


def catchable_errors() -> tuple[type[BaseException], ...]:
    """Exception classes a hub download (or a from_pretrained) raises for access problems.

    OSError covers the hub's HTTP errors and the wrappers transformers / diffusers raise;
    EntryNotFoundError and HFValidationError are not OSErrors; httpx transport errors neither.
    """
    hub = _hub_error_classes()
    return (OSError, hub["entry"], hub["validation"], *_network_error_classes())


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> str | None:
    """'gated', 'revision', 'repo', 'missing', 'offline' or None for `exc` or anything it wraps."""
    hub = _hub_error_classes()
    network = _network_error_classes()
    for err in _chain(exc):
        # Order matters: GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError an
        # EntryNotFoundError.
        if isinstance(err, hub["gated"]):
            return "gated"
        if isinstance(err, hub["revision"]):
            return "revision"
        if isinstance(err, hub["repo"]):
            return "repo"
        if isinstance(err, hub["local"] | hub["offline"]):
            return "offline"
        if isinstance(err, hub["entry"]):
            return "missing"
        if isinstance(err, network):
            return "offline"
    return None


def translate_hub_error(
    exc: BaseException,
    repo: str,
    filename: str | None = None,
    revision: str | None = None,
    command: str | None = None,
    what: str | None = None,
) -> HubAccessError | None:
    """A one-line `HubAccessError` for a hub failure (or None when `exc` is not one).

    filename: the file (or folder) inside `repo`; command: the download command to suggest when
    offline (default: `hf download <repo> [<filename>]`); what: how to name the thing in messages.
    """
    kind = classify(exc)
    if kind is None:
        return None
    at = f" at revision {revision}" if revision else ""
    target = what or (f"{filename} of {repo}" if filename else repo)
    if kind == "gated":
        return HubGatedError(
            f"{repo} is a gated repo and this machine has no access to it: accept its licence at "
            f"{HUB_URL}/{repo} and log in with `hf auth login` (or set HF_TOKEN)"
        )
    if kind == "revision":
        return HubRevisionNotFoundError(
            f"revision {revision!r} does not exist in {repo}; pass an existing branch, tag or commit "
            f"(see {HUB_URL}/{repo}/commits/main)"
        )
    if kind == "repo":
        return HubRepoNotFoundError(
            f"{repo} does not exist on the Hugging Face hub or is private; check the name, "
            "or log in with `hf auth login` if it is private"
        )
    if kind == "missing":
        return HubFileMissingError(
            f"{filename or 'the requested file'} is not in the {repo} repo{at}; check the file name "
            f"(see {HUB_URL}/{repo}/tree/{revision or 'main'})"
        )
    reason = offline_reason()
    command = command or download_command(repo, filename, revision)
    return HubOfflineError(f"{target}{at} is not in the local cache and {reason}; download it with: {command}")


@contextmanager
def hub_errors(
    repo: str,
    filename: str | None = None,
    revision: str | None = None,
    command: str | None = None,
    what: str | None = None,
) -> Iterator[None]:
    """Re-raise hub access failures inside the block as one-line `HubAccessError`s; others pass."""
    try:
        yield
    except HubAccessError:
        raise
    except catchable_errors() as exc:
        translated = translate_hub_error(exc, repo, filename, revision, command, what)
        if translated is None:
            raise
        raise translated from exc


def hub_file(repo: str, filename: str, revision: str | None = None, command: str | None = None) -> Path:
    """`hf_hub_download` of one file (cache first), with one-line errors."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo, filename, revision, command):
        return Path(hf_hub_download(repo, filename, revision=revision))


def hub_folder(repo: str, folder: str, revision: str | None = None, command: str | None = None) -> Path:
    """`snapshot_download` of one folder of a repo; returns the folder inside the snapshot."""
    from huggingface_hub import snapshot_download

    folder = folder.strip("/")
    with hub_errors(repo, folder, revision, command):
        root = snapshot_download(repo, allow_patterns=[f"{folder}/*"], revision=revision)
    path = Path(root) / folder
    if not path.is_dir() or not any(path.iterdir()):
        # snapshot_download returns the (possibly empty) snapshot even when nothing matched.
        raise HubFileMissingError(
            f"{folder}/ is not in the {repo} repo{f' at revision {revision}' if revision else ''} "
            "(or not in the local cache)"
            + (f"; download it with: {command or download_command(repo, folder, revision)}")
        )
    return path


# Files `from_pretrained` fetches: weights as safetensors, configs and tokenizer files (not .bin / .msgpack /
# .onnx / .gguf / .ckpt copies, images or docs).
_LOADED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja")
_VARIANT_INFIXES = (".fp16.", ".bf16.", ".fp32.", ".ema.", ".non_ema.")


def _is_variant(path: str) -> bool:
    return any(infix in path for infix in _VARIANT_INFIXES)


def loaded_files_size(files: dict[str, int | None]) -> int | None:
    """Bytes a diffusers / transformers `from_pretrained` of a repo fetches, from its {path: size} listing:
    a pipeline (model_index.json at the root) loads its sub-folders only, a model its root files; of either,
    safetensors weights of the default variant, configs and tokenizer files. None when no size is known."""
    pipeline = "model_index.json" in files
    chosen = {}
    for path, size in files.items():
        folder, _, name = path.rpartition("/")
        if (pipeline and not folder and name != "model_index.json") or (not pipeline and folder):
            continue
        if name.endswith(_LOADED_SUFFIXES) and size is not None:
            chosen[path] = size
    # a variant copy (diffusion_pytorch_model.fp16.safetensors) is fetched only when asked for: it does not count
    # where its folder has default-variant weights
    plain = {p.rpartition("/")[0] for p in chosen if p.endswith(".safetensors") and not _is_variant(p)}
    sizes = [s for p, s in chosen.items() if not (_is_variant(p) and p.rpartition("/")[0] in plain)]
    return sum(sizes) if sizes else None


@functools.cache
def _hub_answers_listings() -> bool:
    """One reachability probe per process for the listings (a dry run lists many repos)."""
    return hub_may_answer()


def hub_listing(repo: str, revision: str | None = None) -> dict[str, int | None] | None:
    """{path: size} of every file of a model repo, as the hub lists them: one metadata request per repo and
    process. None offline, when the hub cannot be reached, or on any error (sizes are a hint for the user,
    never a reason to fail)."""
    if is_offline() or not _hub_answers_listings():
        return None
    return _ask_listing(repo, revision)


@functools.cache
def _ask_listing(repo: str, revision: str | None) -> dict[str, int | None] | None:
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, timeout=10)
    except Exception:  # noqa: BLE001 - network, auth, a changed hub API: no sizes, the rest of the report stands
        return None
    return {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def download_size(repo: str, path: str | None = None, revision: str | None = None) -> int | None:
    """Bytes a first use would fetch from the hub: the file or folder `path` of `repo`, or (None) what
    `from_pretrained` loads of the repo (`loaded_files_size`). None where the hub's listing is not to be had."""
    files = hub_listing(repo, revision)
    if files is None:
        return None
    if path is None:
        return loaded_files_size(files)
    if path in files:
        return files[path]
    inside = [size for name, size in files.items() if name.startswith(path.rstrip("/") + "/") and size is not None]
    return sum(inside) if inside else None
