"""Make assets/report.png, the README's screenshot of a report: a from_clean run of the three test images in
assets/ with tiny random-weight models (so the decodes are noise), rendered by headless Chromium.

    PYTHONPATH=. python tests/make_report_screenshot.py [OUT.png]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_run(out_dir: Path) -> Path:
    from pid.inference.from_clean import load_config, run
    from pid.latents import get as get_space

    from tiny import tiny_decoder
    from tiny_vaes import tiny_autoencoder_kl

    # the manifest's relative image paths resolve from the CWD: run where a copy of assets/ sits
    shutil.copytree(ROOT / "assets", out_dir / "assets", ignore=shutil.ignore_patterns("report.png"))
    os.chdir(out_dir)
    cfg = load_config(["backbone=sd3", "manifest=assets/clean_image_manifest.jsonl",
                       "degrade_sigmas=[0,0.3,0.6]", "pid_steps=1", "max_side=256",
                       "device=cpu", "output_dir=outputs"])
    space = get_space("sd3").attach(tiny_autoencoder_kl(latent_channels=16))
    run(cfg, decoder=tiny_decoder("sd3", "2k"), latent_space=space)
    return next(p for p in (out_dir / "outputs").iterdir() if p.is_dir())


def screenshot(report: Path, out: Path) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 1500}, device_scale_factor=1)
        page.goto(report.as_uri())
        page.select_option("#size", "380px")
        page.locator("section.group").first.scroll_into_view_if_needed()
        page.evaluate("() => window.scrollTo(0, 0)")
        page.wait_for_timeout(300)  # let the scroll settle (scrolling closes the magnifier)
        card = page.locator("article.card").nth(1)
        viewer = card.locator(".viewer")
        box = viewer.bounding_box()
        page.mouse.click(box["x"] + 0.35 * box["width"], box["y"] + 0.5 * box["height"])
        page.mouse.move(box["x"] + 0.42 * box["width"], box["y"] + 0.3 * box["height"])
        page.wait_for_function("() => document.querySelector('#loupe .pane[data-side=b]').dataset.state === 'full'")
        png = page.screenshot()
        browser.close()
    tmp = out.with_suffix(".tmp.png")
    tmp.write_bytes(png)
    # a 64-colour palette keeps the committed PNG small
    Image.open(tmp).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    tmp.unlink()


def main() -> None:
    from pid.report import write_report

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "assets" / "report.png"
    with tempfile.TemporaryDirectory() as folder:
        run_dir = make_run(Path(folder))
        screenshot(write_report(run_dir), out)
    print(out, out.stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main()
