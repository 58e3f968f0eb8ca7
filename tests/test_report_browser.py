"""The report in a real browser: headless Chromium (Debian's package) driven by Playwright.

Skipped only where no Chromium is installed; .ci/run installs it, so CI always runs this. Set PID_CHROMIUM to
use another Chromium binary.
"""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pid.report import compare_runs, write_report

from report_runs import make_clean_run, make_ldm_run, noise_image, source_images

CHROMIUM = os.environ.get("PID_CHROMIUM") or next(
    (path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")

PREVIEW = 128  # small previews, so the full-size pixels the magnifier must show differ from them
GRAY, RED = (128, 128, 128), (200, 40, 40)


def split_image(kind: str, name: str, shape: tuple[int, int]) -> np.ndarray:
    """Top half the same flat gray in the VAE and the PiD image; bottom half red (VAE) or noise (PiD)."""
    height, width = shape
    image = np.empty((height, width, 3), np.uint8)
    image[: height // 2] = GRAY
    image[height // 2:] = RED if kind == "vae" else noise_image(kind, name, (height - height // 2, width))
    return image


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    ldm = make_ldm_run(root, ("a red fox in snow", "a lighthouse at dusk"), ldm_size=(96, 128), scale=4,
                       image_fn=split_image, name="sd3_PiD_sd3_2k_pidsteps4_seed0")
    ldm_b = make_ldm_run(root, ("a red fox in snow", "a lighthouse at dusk"), ldm_size=(96, 128), scale=2,
                         name="sd3_PiD_sd3_2kto4k_pidsteps4_seed0")
    sources = source_images(root / "src", ["cat", "my photo #1 \u00e9t\u00e9", "car"])  # '#', ' ', non-ASCII in URLs
    clean = make_clean_run(root, sources, sigmas=(0.0, 0.2, 0.5), perfect_first=True,
                           failures=[{"image": "x.png", "reason": "cannot be decoded"}])
    clean_b = make_clean_run(root, sources[::-1], name="sd3_PiD_sd3_2kto4k_pidsteps4_x4_seed0", variant=1)
    return {
        "ldm": write_report(ldm, preview_max_side=PREVIEW),
        "clean": write_report(clean, preview_max_side=PREVIEW),
        "compare_ldm": compare_runs([ldm, ldm_b], root / "compare_ldm.html", preview_max_side=PREVIEW),
        "compare_clean": compare_runs([clean, clean_b], root / "compare_clean.html", preview_max_side=PREVIEW),
        "ldm_run": ldm,
    }


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # Chromium is here, so the test must run: say what is missing
        pytest.fail("Chromium is installed but Playwright is not: pip install playwright (no browser download needed)")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


class Watched:
    """A page with every console error, page error and failed request recorded."""

    def __init__(self, browser, path, scale=1):
        self.problems = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=scale)
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed request: {r.url} {r.failure}"))
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")

    def close(self):
        self.page.close()
        assert not self.problems, self.problems


def screenshot(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


@pytest.mark.parametrize("name", ["ldm", "clean", "compare_ldm", "compare_clean"])
def test_page_loads_from_file_and_every_preview_decodes(browser, reports, name):
    watched = Watched(browser, reports[name])
    page = watched.page
    # lazy images: ask for all of them now and wait for each to decode
    results = page.evaluate("""async () => Promise.all(
        Array.from(document.images).filter(img => img.getAttribute('src')).map(async img => {
            img.loading = 'eager';
            try { await img.decode(); } catch (e) { return [img.getAttribute('src'), 0]; }
            return [img.getAttribute('src'), img.naturalWidth];
        }))""")
    assert results, "no images on the page"
    failed = [src for src, width in results if width == 0]
    assert not failed, failed
    assert all(src.endswith(".jpg") for src, _ in results)  # the page shows previews, never full files
    cards = page.locator("article.card").count()
    assert cards > 0 and page.locator("#count").inner_text() == f"showing {cards} of {cards}"
    watched.close()


def test_slider_changes_the_pixels_where_the_two_images_differ(browser, reports):
    watched = Watched(browser, reports["ldm"])
    page = watched.page
    viewer = page.locator("article.card").first.locator(".viewer")
    viewer.scroll_into_view_if_needed()
    box = viewer.bounding_box()
    shots = []
    for fraction in (0.2, 0.8):
        page.mouse.click(box["x"] + fraction * box["width"], box["y"] + 0.5 * box["height"])
        page.mouse.move(2, 2)  # away: the magnifier closes
        page.wait_for_timeout(50)
        shots.append(screenshot(viewer))
    first, second = shots
    height, width = first.shape[:2]
    changed = np.abs(first - second).max(axis=2) > 40
    x20, x80 = round(0.2 * width), round(0.8 * width)
    near_handles = np.zeros(width, bool)
    for x in (x20, x80):
        near_handles[max(0, x - 4): x + 5] = True
    top, bottom = changed[: int(0.4 * height)], changed[int(0.6 * height):]
    # where the images are equal (the gray top half) only the handle moved
    assert not top[:, ~near_handles].any()
    assert top[:, near_handles].any()
    # where they differ, the pixels between the two slider positions changed and none outside them did
    between = bottom[:, x20 + 5: x80 - 4]
    assert between.mean() > 0.9, between.mean()
    assert not bottom[:, : x20 - 4].any() and not bottom[:, x80 + 5:].any()
    # the range input drives the same slider
    page.locator("article.card").first.locator("input.pos").fill("900")
    handle = page.locator("article.card").first.locator(".handle").bounding_box()
    assert abs(handle["x"] + handle["width"] / 2 - (box["x"] + 0.9 * box["width"])) < 2
    watched.close()


@pytest.mark.parametrize("scale", [1, 2], ids=["dpr1", "dpr2"])
def test_magnifier_shows_full_resolution_pixels_of_both_sides(browser, reports, scale):
    """One image pixel per device pixel, on ordinary and on HiDPI screens."""
    watched = Watched(browser, reports["ldm"], scale)
    page = watched.page
    card = page.locator("article.card").first
    viewer = card.locator(".viewer")
    viewer.scroll_into_view_if_needed()
    box = viewer.bounding_box()
    page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.75 * box["height"])
    page.wait_for_function("""() => Array.from(document.querySelectorAll('#loupe .pane'))
        .every(p => p.dataset.state === 'full')""", timeout=10000)
    pane_a = page.locator('#loupe .pane[data-side="a"]')
    pane_b = page.locator('#loupe .pane[data-side="b"]')
    assert pane_b.locator("img").get_attribute("src") == "pid/step_24xt/00000000.png"
    assert pane_a.locator("img").get_attribute("src") == "vae/step_24xt/00000000.png"
    assert "1:1" in pane_b.locator("figcaption").inner_text()
    px, py = map(int, pane_b.get_attribute("data-px").split(","))  # the pixel under the pointer
    full = np.asarray(Image.open(reports["ldm_run"] / "pid" / "step_24xt" / "00000000.png").convert("RGB")).astype(int)
    assert (px, py) == (full.shape[1] // 2, int(0.75 * full.shape[0]))
    shown = screenshot(pane_b.locator(".win"))  # in device pixels
    assert shown.shape[0] == 176 * scale
    half = shown.shape[0] // 2
    expected = window(full, px, py, half)
    inside = window(np.ones_like(full), px, py, half).astype(bool)  # the pane may reach past the image
    assert np.abs(shown - expected)[inside].mean() < 1.0  # the full file's own pixels, one per device pixel
    assert (shown[~inside] == 0).all()  # and black past its edge
    # ... which the preview could not have shown: it is 4x smaller
    preview = Image.open(reports["ldm_run"] / "previews" / "pid" / "step_24xt" / "00000000.jpg").convert("RGB")
    from_preview = np.asarray(preview.resize(full.shape[1::-1], Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(window(from_preview, px, py, half) - expected)[inside].mean() > 15
    # the other side, at the same place: the VAE decode's red bottom half, upscaled to PiD's size
    left = screenshot(pane_a.locator(".win"))
    red_rows = window(np.ones_like(full), px, py, half)[:, :, 0].astype(bool) & (
        np.arange(2 * half)[:, None] + py - half >= full.shape[0] // 2 + 8)  # well inside the red half
    assert np.abs(left - np.array(RED))[red_rows].mean() < 3
    page.mouse.move(2, 2)
    assert page.locator("#loupe").is_hidden()
    watched.close()


def window(image: np.ndarray, px: int, py: int, half: int) -> np.ndarray:
    """The 2*half square of `image` centred on pixel (px, py), zeros where it reaches past the image."""
    out = np.zeros((2 * half, 2 * half, image.shape[2]), image.dtype)
    top, left = py - half, px - half
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(image.shape[0], top + 2 * half), min(image.shape[1], left + 2 * half)
    out[y0 - top: y1 - top, x0 - left: x1 - left] = image[y0:y1, x0:x1]
    return out


def _column(page, table, index):
    return page.evaluate("""([table, index]) => Array.from(document.querySelectorAll(table + ' tbody tr'))
        .map(row => parseFloat(row.cells[index].getAttribute('data-v')))""", [table, index])


def test_metrics_table_sorts(browser, reports):
    watched = Watched(browser, reports["clean"])
    page = watched.page
    headers = page.locator("#metrics-table thead th")
    titles = [headers.nth(i).inner_text() for i in range(headers.count())]
    psnr = titles.index("PSNR (dB)")
    before = _column(page, "#metrics-table", psnr)
    assert before != sorted(before)
    headers.nth(psnr).locator("button").click()
    ascending = _column(page, "#metrics-table", psnr)
    assert ascending == sorted(before) and ascending[-1] == float("inf")
    assert headers.nth(psnr).get_attribute("aria-sort") == "ascending"
    headers.nth(psnr).locator("button").click()
    assert _column(page, "#metrics-table", psnr) == sorted(before, reverse=True)
    image = titles.index("image")
    headers.nth(image).locator("button").click()
    names = page.evaluate("() => Array.from(document.querySelectorAll('#metrics-table tbody tr'))"
                          ".map(r => r.cells[0].textContent)")
    assert names == sorted(names) and len(names) == 18
    # the compare table sorts by its delta columns too
    watched.close()
    watched = Watched(browser, reports["compare_clean"])
    page = watched.page
    headers = page.locator("#metrics-table thead th")
    titles = [headers.nth(i).inner_text() for i in range(headers.count())]
    delta = next(i for i, t in enumerate(titles) if t.startswith("\u0394 PSNR"))
    headers.nth(delta).locator("button").click()
    values = _column(page, "#metrics-table", delta)
    assert values == sorted(values)
    watched.close()


def test_filters_by_step_and_text(browser, reports):
    watched = Watched(browser, reports["ldm"])
    page = watched.page
    assert page.locator("article.card:visible").count() == 4
    page.locator('input.f-tag[value="x0"]').uncheck()
    assert page.locator("article.card:visible").count() == 2
    assert page.locator("#count").inner_text() == "showing 2 of 4"
    page.locator("#q").fill("lighthouse")
    assert page.locator("article.card:visible").count() == 1
    assert page.locator("section.group:visible h2").inner_text() == "a lighthouse at dusk"
    page.locator('input.f-tag[value="x0"]').check()
    page.locator("#q").fill("")
    assert page.locator("article.card:visible").count() == 4
    watched.close()


@pytest.fixture(scope="module")
def http_root(reports):
    """The reports served over HTTP (Playwright can hold back http requests, not file:// ones)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = reports["ldm"].parent.parent
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_pid_half_never_shows_the_vae_image_while_loading(browser, reports, http_root):
    """The VAE preview has loaded, the PiD one is still on its way: the PiD side of the slider stays dark (it
    must not show the VAE image underneath under the "PiD" label), then shows PiD once it arrives."""
    root, base = http_root
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    held = []
    page.route("**/previews/pid/**", lambda route: held.append(route))
    try:
        page.goto(f"{base}/{reports['ldm'].relative_to(root).as_posix()}", wait_until="domcontentloaded")
        card = page.locator("article.card").first
        page.wait_for_function("""() => { const img = document.querySelector('article.card img.va');
            return img.complete && img.naturalWidth > 0; }""", timeout=10000)
        assert held and not page.evaluate("() => document.querySelector('article.card img.vb').complete")
        viewer = card.locator(".viewer")
        loading = screenshot(viewer)
        height, width = loading.shape[:2]
        left, right = loading[:, : int(0.45 * width)], loading[:, int(0.55 * width):]
        assert np.abs(left[int(0.8 * height):] - np.array(RED)).mean() < 8  # the VAE half shows the VAE image
        below_tag = right[int(0.15 * height):]  # under the "PiD" label in the corner
        assert np.abs(below_tag - np.array([0x22, 0x22, 0x22])).max() < 8  # the PiD half: nothing yet, never the VAE
        for route in held:
            route.continue_()
        page.wait_for_function("""() => { const img = document.querySelector('article.card img.vb');
            return img.complete && img.naturalWidth > 0; }""", timeout=10000)
        loaded = screenshot(viewer)
        right = loaded[:, int(0.55 * width):]
        assert np.abs(right[: int(0.4 * height)] - np.array(GRAY)).mean() < 8  # PiD's gray top half
        assert np.abs(right[int(0.6 * height):] - np.array(RED)).mean() > 40  # PiD's noise, not the VAE red
    finally:
        page.unroute("**/previews/pid/**")
        page.close()
