"""Inputs and outputs of the inference CLIs: images, prompt files, manifests, atomic writes, names and tags.

Value ranges (each function says which it takes):
- PiD and the VAEs work in [-1, 1] ("signed"); `load_image` returns that, `signed_to_uint8` takes it.
- Metrics and comparison images work in [0, 1] ("unit"); `unit_to_uint8` and `make_comparison` take that.
- uint8 conversion truncates, like the reference tooling (spec §10.1), so re-running gives identical files:
  signed: uint8(clamp(x, -1, 1) + 1) * 127.5), unit: uint8(clamp(x, 0, 1) * 255).

Every write goes to a temporary file in the target folder, is fsynced, then renamed over the target with
`os.replace`, so a crash never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from PIL import Image, ImageOps, UnidentifiedImageError

from pid.errors import InputError

try:
    import fcntl  # advisory locks for append_jsonl; absent on Windows
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
JPEG_QUALITY = 95
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ------------------------------------------------------------------------------------------------------------
# Names


def sample_name(index: int) -> str:
    """Stable per-sample file stem: the global index, zero-padded to 8 digits."""
    return f"{index:08d}"


def step_label(step: int | None) -> str:
    """Label of a captured LDM step K (`"07xt"`), or `"x0"` for the final latent (step None)."""
    return "x0" if step is None else f"{step:02d}xt"


def step_dir(label: str) -> str:
    return f"step_{label}"


def sigma_dir(sigma: float) -> str:
    return f"sigma_{sigma:.3f}"


def tag_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def build_run_tag(
    backbone: str,
    checkpoint_path: str | os.PathLike[str],
    *,
    pid_steps: int,
    weights: str | None = None,
    cfg_scale: float | None = None,
    shift: float | None = None,
    note: str = "",
) -> str:
    """Folder name of a run: `<backbone>_<exp>_<ckpt
    stem>[_cfg<c>]_steps<n>[_shift<s>][_note_<note>][_<weights>]`.

    `<exp>` is the checkpoint's folder, or the folder above it for the DCP layout `<exp>/checkpoints/iter_X`.
    Unlike the reference, cfg and shift appear only when given (the distilled sampler ignores both), `weights`
    ("ema"/"reg") only when the caller knows it, and the note is made filesystem-safe.
    """
    path = Path(checkpoint_path)
    parent = path.parent
    experiment = parent.parent.name if parent.name == "checkpoints" else parent.name
    parts = [backbone]
    if experiment:
        parts.append(tag_safe(experiment))
    parts.append(tag_safe(path.stem if path.suffix in (".pth", ".pt", ".safetensors") else path.name))
    if cfg_scale is not None:
        parts.append(f"cfg{cfg_scale}")
    parts.append(f"steps{pid_steps}")
    if shift is not None:
        parts.append(f"shift{shift}")
    if note:
        parts.append(f"note_{tag_safe(note)}")
    if weights:
        parts.append(weights)
    return "_".join(parts)


def should_skip(paths: Iterable[str | os.PathLike[str]], overwrite: bool) -> bool:
    """Resume helper: True when not overwriting and every output already exists as a non-empty file."""
    if overwrite:
        return False
    paths = list(paths)
    return bool(paths) and all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in paths)


# ------------------------------------------------------------------------------------------------------------
# Image reading


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to RGB uint8, shape (H, W, 3).

    Grayscale, palette, CMYK and 16-bit images are converted (16-bit keeps the high byte); alpha is composited
    over white. Each conversion logs a warning. A missing, empty, truncated or undecodable file: InputError.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    if not path.is_file():
        raise InputError(f"image {path} is not a file")
    return decode_image(path.read_bytes(), path)


def decode_image(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    """`read_image` of bytes already read (a tar member, ...); `path` names the image in messages."""
    path = Path(path)
    if not data:
        raise InputError(f"image {path} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes fully: truncated files raise here, not later
            # Cameras store portraits sideways with an EXIF orientation tag; apply it like every viewer does.
            upright = ImageOps.exif_transpose(img)
            return _to_rgb_uint8(upright, path, data)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"image {path} is not in an image format Pillow can read (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise InputError(f"image {path} is larger than Pillow's safety limit; shrink it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = re.sub(r"<[^>]*object at 0x[0-9a-f]+>", "the file", reason)
        raise InputError(f"image {path} cannot be decoded ({reason})") from None


def _to_rgb_uint8(img: Image.Image, path: Path, data: bytes) -> np.ndarray:
    mode = img.mode
    if data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[24] == 16 and mode == "RGB":
        logger.warning(f"{path}: 16-bit PNG reduced to 8 bits per channel")
    if mode == "RGB":
        out = np.asarray(img, dtype=np.uint8)
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the high byte (what Pillow does for 16-bit RGB), then replicate to RGB.
        values = np.asarray(img).astype(np.int64)
        gray = np.clip(values >> 8, 0, 255).astype(np.uint8)
        logger.warning(f"{path}: 16-bit grayscale image ({mode}) converted to 8-bit RGB")
        out = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values) * scale, 0, 255).astype(np.uint8)
        logger.warning(f"{path}: floating-point grayscale image converted to 8-bit RGB")
        out = np.repeat(gray[..., None], 3, axis=2)
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
        logger.warning(f"{path}: image with alpha ({mode}) composited over white")
    else:
        out = np.asarray(img.convert("RGB"), dtype=np.uint8)
        logger.warning(f"{path}: {mode} image converted to RGB")
    if out.shape[0] == 0 or out.shape[1] == 0:
        raise InputError(f"image {path} has no pixels")
    return np.array(out, dtype=np.uint8, order="C")  # writable, contiguous


def downsize_to_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an (H, W, C) uint8 image with area averaging so max(H, W) <= max_side; smaller images are
    unchanged."""
    import cv2

    height, width = image.shape[:2]
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    new_w = max(1, min(max_side, round(width * scale)))
    new_h = max(1, min(max_side, round(height * scale)))
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def center_crop_to_multiple(image: np.ndarray, multiple: int = 16, *, name: str = "image") -> np.ndarray:
    """Centre-crop an (H, W, ...) array so both sides are multiples of `multiple` (left = (W - W')//2,
    etc.)."""
    height, width = image.shape[:2]
    new_h, new_w = height - height % multiple, width - width % multiple
    if new_h == 0 or new_w == 0:
        raise InputError(f"{name} size {width}x{height} is smaller than the required multiple of {multiple}")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return image[top : top + new_h, left : left + new_w]


def uint8_to_tensor(image: np.ndarray, *, signed: bool = True) -> torch.Tensor:
    """(H, W, 3) uint8 -> float32 [1, 3, H, W]: x/127.5 - 1 in [-1, 1] when `signed`, else x/255."""
    # A copy: arrays decoded by PIL are read-only, and torch warns about sharing them.
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float()
    return tensor / 127.5 - 1.0 if signed else tensor / 255.0


def load_image(
    path: str | os.PathLike[str],
    *,
    multiple: int = 16,
    max_side: int | None = None,
    signed: bool = True,
) -> torch.Tensor:
    """Read an image, shrink it so its longer side is <= `max_side` (if given), centre-crop to `multiple`.

    Returns float32 [1, 3, H, W] in [-1, 1] (or [0, 1] with `signed=False`) on the CPU.
    """
    image = read_image(path)
    if max_side is not None:
        image = downsize_to_max_side(image, max_side)
    image = center_crop_to_multiple(image, multiple, name=f"image {path}")
    return uint8_to_tensor(image, signed=signed)


# ------------------------------------------------------------------------------------------------------------
# Prompt files and manifests


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None


# Prompt sets shipped with the package, at the path the upstream README uses (pid/_src/inference/prompts/).
PROMPT_SETS_DIR = Path(__file__).resolve().parents[1] / "_src" / "inference" / "prompts"


def shipped_prompt_sets() -> dict[str, Path]:
    """Short name -> file of every shipped prompt set (`creative` -> prompt_creative.txt)."""
    return {p.stem.removeprefix("prompt_"): p for p in sorted(PROMPT_SETS_DIR.glob("prompt_*.txt"))}


def resolve_prompt_file(value: str | os.PathLike[str]) -> Path:
    """A prompt file path as given, else a shipped set by short name (`creative`, `zimage_turbo`) or file name;
    also the upstream path `pid/_src/inference/prompts/<file>` from any working folder."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    sets = shipped_prompt_sets()
    name = str(value)
    for candidate in (name, Path(name).stem, Path(name).stem.removeprefix("prompt_")):
        if candidate in sets and (candidate == name or Path(name).name in (sets[candidate].name, candidate)):
            return sets[candidate]
    names = ", ".join(sets)
    raise InputError(f"prompt file {path} does not exist; give a text file with one prompt per line, or a shipped "
                     f"set: {names}")


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per line; surrounding whitespace is stripped, blank lines and lines starting with `#`
    skipped."""
    path = Path(path)
    prompts = [line.strip() for line in _read_text(path, "prompt file").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (only blank or # lines)")
    return prompts


@dataclass(frozen=True)
class ManifestEntry:
    image: Path  # absolute, or resolved against the manifest's folder (else the working folder)
    prompt: str | None
    line: int  # 1-based line number in the manifest
    searched: tuple[Path, ...] = ()  # where a relative path was looked for (all of them, when none exists)
    # the training manifest's shorter captions (pid.training.data samples among the present ones)
    prompt_medium: str | None = None
    prompt_short: str | None = None

    def missing_reason(self) -> str | None:
        """None when the image file exists; else a sentence naming every place it was looked for."""
        if self.image.is_file():
            return None
        places = self.searched or (self.image,)
        if len(places) == 1:
            return f"image {places[0]} does not exist"
        return f"image {self.image.name} does not exist at {' nor at '.join(str(p) for p in places)}"


def read_manifest(path: str | os.PathLike[str], *, check_images: bool = False) -> list[ManifestEntry]:
    """JSONL with one `{"image": path, "prompt": text}` object per line (`prompt` optional, blank lines
    skipped).

    Relative image paths are resolved against the manifest's folder first, then the working folder (upstream's
    manifests name images relative to where the command runs). With `check_images`, a missing image file is reported now, before any model loads.
    """
    path = Path(path)
    base = path.resolve().parent
    entries: list[ManifestEntry] = []
    for number, raw in enumerate(_read_text(path, "manifest").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"manifest {path} line {number} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise InputError(f"manifest {path} line {number} is not a JSON object")
        image = record.get("image")
        if not isinstance(image, str) or not image.strip():
            raise InputError(f'manifest {path} line {number} has no "image" path')
        prompt = record.get("prompt")
        for name in ("prompt", "prompt_medium", "prompt_short"):
            if record.get(name) is not None and not isinstance(record[name], str):
                raise InputError(f'manifest {path} line {number}: "{name}" must be a string')
        image_path = Path(image).expanduser()
        searched: tuple[Path, ...] = ()
        if not image_path.is_absolute():
            # Our manifests name images relative to themselves; upstream's relative to the working folder.
            searched = (base / image_path, Path.cwd() / image_path)
            image_path = next((p for p in searched if p.is_file()), searched[0])
        shorter = {name: record[name].strip() or None for name in ("prompt_medium", "prompt_short") if record.get(name)}
        entry = ManifestEntry(image=image_path, prompt=prompt.strip() if prompt else None, line=number,
                              searched=searched, **shorter)
        if check_images and entry.missing_reason():
            raise InputError(f"manifest {path} line {number}: {entry.missing_reason()}")
        entries.append(entry)
    if not entries:
        raise InputError(f"manifest {path} has no entries")
    return entries


# ------------------------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. Windows); the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads out meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def read_json_file(path: str | os.PathLike[str]) -> Any:
    """A JSON file's value, with the "inf"/"nan" strings `to_json` writes turned back into floats; unreadable or
    invalid JSON is an InputError naming the file."""
    path = Path(path)
    try:
        return restore_non_finite_values(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a readable JSON file ({type(err).__name__})") from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; on success it is fsynced and renamed over `path` with the
    mode any new file of the user gets (0644 under umask 022), on failure removed. Creates parent folders.

        with atomic_output("model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file 0600; writers that replace the file (safetensors, torch.save) keep that mode
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_safe_floats(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings ("inf") so every reader can parse the file.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json_safe_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe_floats(v) for v in value]
    return value


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """JSON text with Paths, tensors and numpy values converted, and inf/nan written as strings."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_json_safe_floats(plain), indent=indent, ensure_ascii=False, allow_nan=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    return atomic_write_text(path, to_json(obj) + "\n")


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    """Atomically write rows as CSV; columns are `fieldnames` or every key in first-seen order."""
    if fieldnames is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        fieldnames = list(seen)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    """Append one JSON line to `path` (e.g. metadata.jsonl) so concurrent writers never interleave or tear
    lines.

    One `write` on an O_APPEND descriptor under an exclusive `flock` (where available), then fsync. A line
    left without its newline by an earlier crash is terminated first, so the new record stays parseable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = to_json(record, indent=None).encode("utf-8") + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()
        size = os.fstat(fd).st_size
        if size > 0:
            with open(path, "rb") as reader:
                reader.seek(size - 1)
                if reader.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def restore_non_finite_values(value: Any) -> Any:
    """The strings "inf", "-inf" and "nan" (how `to_json` writes non-finite floats) as floats again."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: restore_non_finite_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_non_finite_values(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike[str], *, restore_non_finite: bool = True) -> list[dict[str, Any]]:
    """Every JSON object in a JSONL file (blank lines skipped); a bad line raises InputError naming it.

    With `restore_non_finite`, the strings "inf", "-inf" and "nan" that `to_json` writes for non-finite floats
    become floats again, so records round-trip (a string value that is exactly one of those is converted too).
    """
    path = Path(path)
    records = []
    for number, raw in enumerate(_read_text(path, "JSONL file").splitlines(), start=1):
        if raw.strip():
            try:
                record = json.loads(raw)
                records.append(restore_non_finite_values(record) if restore_non_finite else record)
            except json.JSONDecodeError as err:
                raise InputError(f"JSONL file {path} line {number} is not valid JSON: {err.msg}") from None
    return records


# ------------------------------------------------------------------------------------------------------------
# Image writing


def _to_hwc(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if tensor.ndim == 4 and tensor.shape[0] == 1 and tensor.shape[1] in (1, 3):
        tensor = tensor[0]  # [1, C, H, W]
    elif tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]  # [C, 1, H, W] (video-tokenizer layout)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image [3, H, W], [1, 3, H, W] or [3, 1, H, W], got {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        logger.warning("image has non-finite values; writing them as 0")
        tensor = torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0)
    return tensor.expand(3, -1, -1).permute(1, 2, 0)


def signed_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] image ([3, H, W], [1, 3, H, W] or [3, 1, H, W]) -> (H, W, 3) uint8, truncating (x+1)*127.5."""
    hwc = _to_hwc(image).clamp(-1.0, 1.0)
    return ((hwc + 1.0) * 127.5).numpy().astype(np.uint8)


def unit_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] image ([3, H, W], [1, 3, H, W] or [3, 1, H, W]) -> (H, W, 3) uint8 by truncating x*255."""
    hwc = _to_hwc(image).clamp(0.0, 1.0)
    return (hwc * 255.0).numpy().astype(np.uint8)


def encode_image(image: np.ndarray, suffix: str, *, quality: int = JPEG_QUALITY) -> bytes:
    """Encode (H, W, 3) uint8 RGB as PNG or JPEG (quality 95, 4:2:0) bytes; `suffix` picks the format."""
    suffix = suffix.lower()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if suffix == ".png":
        pil.save(buffer, format="PNG")
    elif suffix in (".jpg", ".jpeg"):
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unsupported image format {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
    return buffer.getvalue()


def write_image(path: str | os.PathLike[str], image: np.ndarray, *, quality: int = JPEG_QUALITY) -> Path:
    """Atomically write an (H, W, 3) uint8 RGB image; the format follows the extension (.png, .jpg, .jpeg)."""
    path = Path(path)
    return atomic_write_bytes(path, encode_image(image, path.suffix, quality=quality))


# ------------------------------------------------------------------------------------------------------------
# Comparison image


def _put_label(canvas: np.ndarray, text: str, x: int, y: int, scale: float, thickness: int) -> None:
    import cv2

    # A dark outline under white text stays readable on any background.
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(
        canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA
    )


def make_comparison(
    baseline: torch.Tensor,
    pid: torch.Tensor,
    *,
    labels: tuple[str, str] = ("baseline", "PiD"),
    separator: int = 4,
) -> np.ndarray:
    """Side-by-side (H, 2W + separator, 3) uint8: the baseline resized to PiD's size (antialiased bicubic, see
    `pid.metrics.resize_to`), a white separator, then PiD, each with a small label. Both inputs in [0, 1],
    [3, H, W] or [1, 3, H, W]."""
    from pid.metrics import resize_to

    pid_b = pid if pid.ndim == 4 else pid.unsqueeze(0)
    base_b = baseline if baseline.ndim == 4 else baseline.unsqueeze(0)
    height, width = pid_b.shape[-2:]
    base_b = resize_to(base_b.float().cpu(), (height, width))
    left, right = unit_to_uint8(base_b), unit_to_uint8(pid_b.float().cpu())
    canvas = np.full((height, 2 * width + separator, 3), 255, dtype=np.uint8)
    canvas[:, :width] = left
    canvas[:, width + separator :] = right
    scale = max(0.4, min(height, width) / 512)
    thickness = max(1, round(scale))
    margin = max(4, round(8 * scale))
    baseline_y = margin + round(22 * scale)
    _put_label(canvas, labels[0], margin, baseline_y, scale, thickness)
    _put_label(canvas, labels[1], width + separator + margin, baseline_y, scale, thickness)
    return canvas
