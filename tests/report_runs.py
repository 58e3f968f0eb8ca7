"""Run folders laid out exactly as the CLIs write them (see the run-folder contract in docs/report.md), built from
small generated PNGs of different content, for the report tests (tests/test_report*.py)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

ImageFn = Callable[[str, str, tuple[int, int]], np.ndarray]  # (kind, item name, (H, W)) -> uint8 HxWx3

CLEAN_COLUMNS = ["index", "sample_id", "image", "image_sha256", "prompt", "backbone", "sigma", "decoder", "input_size",
                 "output_size", "psnr", "ssim", "delta_e2000", "seconds", "input", "output", "grid"]


def noise_image(kind: str, name: str, shape: tuple[int, int]) -> np.ndarray:
    """Different content for every (kind, name): a seeded gradient plus noise."""
    seed = int(hashlib.sha256(f"{kind}/{name}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    height, width = shape
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 80, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    image = (base[None, None, :] + ramp + rng.normal(0, 30, (height, width, 3))) % 256
    return image.astype(np.uint8)


def save_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def add_ldm_item(run: Path, index: int, prompt: str, step: str, ldm_step: int | None, sigma: float, *, seed: int = 0,
                 ldm_size: tuple[int, int] = (48, 64), scale: int = 2, image_fn: ImageFn = noise_image,
                 checkpoint: str = "checkpoints/sd3/PiD_sd3_2k.safetensors", with_compare: bool = True) -> dict:
    """Write one (prompt index, step) of a from_ldm run: PiD, VAE and compare images and its metadata line."""
    name = f"{index:08d}.png"
    output_size = (ldm_size[0] * scale, ldm_size[1] * scale)
    label_dir = f"step_{step}"
    vae = image_fn("vae", f"{prompt}/{step}", ldm_size)
    pid = image_fn("pid", f"{prompt}/{step}", output_size)
    save_png(run / "vae" / label_dir / name, vae)
    save_png(run / "pid" / label_dir / name, pid)
    compare = None
    if with_compare:
        upscaled = np.asarray(Image.fromarray(vae).resize(output_size[::-1], Image.Resampling.BICUBIC))
        save_png(run / "compare" / label_dir / name, np.concatenate([upscaled, pid], axis=1))
        compare = f"compare/{label_dir}/{name}"
    record = {
        "index": index, "prompt": prompt, "step": step, "ldm_step": ldm_step, "sigma": sigma,
        "ldm_seed": seed + index, "pid_seed": 7, "backbone": "sd3", "pid_ckpt_type": "2k", "checkpoint": checkpoint,
        "ldm_model": "stabilityai/stable-diffusion-3.5-large", "ldm_size": list(ldm_size), "output_size": list(output_size),
        "ldm_steps": 28, "pid_steps": 4, "pid": f"pid/{label_dir}/{name}", "vae": f"vae/{label_dir}/{name}",
        "compare": compare, "seconds": {"ldm": 1.25, "vae": 0.031, "pid": 0.52},
        "denoiser_steps": {"run": 24, "skipped": 4},
        "item_key": hashlib.sha256(f"{prompt}|{seed + index}|{step}".encode()).hexdigest()[:16],
    }
    _append_jsonl(run / "metadata.jsonl", record)
    return record


LDM_STEPS = (("24xt", 24, 0.4123), ("x0", None, 0.0))


def make_ldm_run(root: Path, prompts: Sequence[str] = ("a red fox in snow", "a lighthouse at dusk"), *,
                 name: str = "sd3_PiD_sd3_2k_pidsteps4_seed0", seed: int = 0,
                 steps: Sequence[tuple[str, int | None, float]] = LDM_STEPS, finished: bool = True,
                 failures: Sequence[dict] = (), **item_kwargs) -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(prompts):
        for step, ldm_step, sigma in steps:
            add_ldm_item(run, index, prompt, step, ldm_step, sigma, seed=seed, **item_kwargs)
    for failure in failures:
        _append_jsonl(run / "failures.jsonl", failure)
    if finished:
        finish_ldm_run(run, len(prompts) * len(steps), len(failures))
    return run


def finish_ldm_run(run: Path, images: int, failed: int = 0) -> None:
    summary = {"entry": "from_ldm", "backbone": "sd3", "ckpt_type": "2k", "images": images, "failed": failed,
               "output_dir": str(run)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))


def source_images(folder: Path, names: Sequence[str], shape: tuple[int, int] = (40, 48)) -> list[Path]:
    """Source photos of a from_clean manifest (their SHA-256 is the identity across runs)."""
    return [save_png(folder / f"{n}.png", noise_image("source", n, shape)) for n in names]


def _metric_values(image: str, sigma: float, decoder: str, variant: int) -> dict[str, float]:
    seed = int(hashlib.sha256(f"{image}/{sigma}/{decoder}/{variant}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    bonus = 3.0 if decoder == "pid" else 0.0
    return {"psnr": round(30 + bonus - 10 * sigma + rng.uniform(-1, 1), 4),
            "ssim": round(0.9 - 0.3 * sigma + rng.uniform(-0.02, 0.02), 5),
            "delta_e2000": round(2.0 + 3 * sigma + rng.uniform(-0.3, 0.3), 4)}


def clean_rows_for(run: Path, index: int, source: Path, sigma: float, *, scale: int = 2, variant: int = 0,
                   image_fn: ImageFn = noise_image, prompt: str = "", perfect: bool = False) -> list[dict]:
    """Write the images of one (image, sigma) of a from_clean run; returns its two metrics rows."""
    sample_id = f"{index:08d}_{source.stem}"
    with Image.open(source) as img:
        width, height = img.size
    folder = f"sigma_{sigma:.3f}"
    save_png(run / "input" / f"{sample_id}.png", np.asarray(Image.open(source).convert("RGB")))
    vae = image_fn("vae", f"{source.stem}/{sigma}/{variant}", (height, width))
    pid = image_fn("pid", f"{source.stem}/{sigma}/{variant}", (height * scale, width * scale))
    save_png(run / "vae" / folder / f"{sample_id}.png", vae)
    save_png(run / "pid" / folder / f"{sample_id}.png", pid)
    save_png(run / "grid" / folder / f"{sample_id}.png", np.zeros((8, 24, 3), np.uint8))
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    rows = []
    for decoder, out in (("vae", vae), ("pid", pid)):
        values = _metric_values(source.stem, sigma, decoder, variant)
        if perfect and decoder == "vae":
            values["psnr"] = float("inf")
        rows.append({
            "index": index, "sample_id": sample_id, "image": str(source), "image_sha256": sha, "prompt": prompt,
            "backbone": "sd3", "sigma": sigma, "decoder": decoder, "input_size": f"{width}x{height}",
            "output_size": f"{out.shape[1]}x{out.shape[0]}", **values, "seconds": 0.12,
            "input": f"input/{sample_id}.png", "output": f"{decoder}/{folder}/{sample_id}.png",
            "grid": f"grid/{folder}/{sample_id}.png",
        })
    return rows


def make_clean_run(root: Path, sources: Sequence[Path], *, name: str = "sd3_PiD_sd3_2k_pidsteps4_x2_seed0",
                   sigmas: Sequence[float] = (0.0, 0.3), variant: int = 0, finished: bool = True,
                   failures: Sequence[dict] = (), perfect_first: bool = False, **kwargs) -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, source in enumerate(sources):
        for sigma in sigmas:
            rows += clean_rows_for(run, index, source, sigma, variant=variant,
                                   perfect=perfect_first and index == 0 and sigma == 0, **kwargs)
    if finished:
        write_metrics_csv(run, rows)
        summary = {"entry": "from_clean", "backbone": "sd3", "ckpt_type": "2k", "scale": 2, "psnr_cap_db": 100.0,
                   "means": {}, "failures": list(failures), "output_dir": str(run)}
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    else:
        for row in rows:
            _append_jsonl(run / "metrics.rank0.jsonl", row)
    for failure in failures:
        _append_jsonl(run / "failures.jsonl", failure)
    return run


def write_metrics_csv(run: Path, rows: Sequence[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CLEAN_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("inf" if isinstance(v, float) and v == float("inf") else v) for k, v in row.items()})
    (run / "metrics.csv").write_text(buffer.getvalue())


# ------------------------------------------------------------------------------------------------------------
# Reading a report back (strict enough to catch what browsers would silently repair)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
BLOCK = {"div", "p", "table", "ul", "ol", "section", "dl", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "article",
         "header", "footer", "nav", "main", "form", "fieldset"}


class ReportParser(HTMLParser):
    """Checks well-formedness (every element closed in order, void elements never closed, no block inside <p>,
    unique ids, alt on every <img>) and collects cards, table rows and every referenced file."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.stack: list[str] = []
        self.ids: set[str] = set()
        self.doctype = ""
        self.cards: list[dict[str, str]] = []
        self.rows: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.panels: list[dict] = []
        self.text: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def _check(self, tag: str, attrs: list[tuple[str, str | None]]) -> dict[str, str]:
        names = [name for name, _ in attrs]
        if len(names) != len(set(names)):
            self.problems.append(f"<{tag}> repeats an attribute: {names}")
        values = {name: value or "" for name, value in attrs}
        if "id" in values:
            if values["id"] in self.ids:
                self.problems.append(f"duplicate id {values['id']!r}")
            self.ids.add(values["id"])
        if tag in BLOCK and "p" in self.stack:
            self.problems.append(f"<{tag}> inside <p>")
        if tag == "img" and "alt" not in values:
            self.problems.append(f"<img> without alt: {values}")
        for key in ("src", "href"):
            value = values.get(key)
            if value and not value.startswith(("#", "http://www.w3.org")):
                self.urls.append(value)
        if tag == "article" and "card" in values.get("class", "").split():
            self.cards.append(values)
            for panel in json.loads(values.get("data-panels", "[]")):
                self.panels.append(panel)
                self.urls += [panel[k] for k in ("src", "full") if k in panel]
        if tag == "tr" and "data-key" in values:
            self.rows.append(values)
        return values

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, attrs)
        if tag not in VOID and "svg" not in self.stack:
            self.problems.append(f"<{tag}/> self-closed outside SVG")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.problems.append(f"</{tag}> closes a void element")
        elif not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> does not close the open <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] not in ("script", "style"):
            self.text.append(data)


def parse_report(path: Path) -> ReportParser:
    """Parse a report; fails the test with every problem found."""
    source = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(source)
    parser.close()
    if parser.doctype.lower() != "doctype html":
        parser.problems.append(f"doctype is {parser.doctype!r}")
    if parser.stack:
        parser.problems.append(f"unclosed elements at the end: {parser.stack}")
    assert not parser.problems, parser.problems
    return parser


def referenced_files(path: Path, parser: ReportParser) -> list[Path]:
    return [path.parent / unquote(url) for url in parser.urls]
