"""The page's CSS and JavaScript, inlined into every report so it works from file:// with no network.

Plain ES2017 and CSS that current Chromium and Firefox both support (clip-path inset, aspect-ratio, custom
properties, pointer events); no libraries.
"""

from __future__ import annotations

LOUPE_PANE_CSS_PX = 176  # side of one magnifier pane; even, so the pointed-at pixel sits on a whole pixel

CSS = """
:root { --bg:#f6f7f9; --fg:#1b1d21; --muted:#5d6470; --card:#fff; --line:#d9dde3; --accent:#2f6fdf;
  --good:#157a3c; --bad:#b3261e; color-scheme: light; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background:var(--bg);
  color:var(--fg); }
header.top { padding:16px 24px 8px; }
header.top h1 { font-size:20px; margin:0 0 4px; word-break:break-all; }
.status { margin:0 0 8px; color:var(--muted); }
.status.progress { color:#8a5a00; }
dl.facts { display:grid; grid-template-columns:max-content 1fr; gap:2px 12px; margin:6px 0; }
dl.facts dt { color:var(--muted); }
dl.facts dd { margin:0; word-break:break-all; }
nav.toolbar { position:sticky; top:0; z-index:5; display:flex; flex-wrap:wrap; gap:8px 16px; align-items:center;
  padding:8px 24px; background:rgba(246,247,249,.96); border-bottom:1px solid var(--line); }
nav.toolbar input[type=search] { width:min(360px, 80vw); padding:5px 8px; border:1px solid var(--line);
  border-radius:6px; font:inherit; }
nav.toolbar fieldset { border:0; margin:0; padding:0; display:flex; flex-wrap:wrap; gap:4px 10px; align-items:center; }
nav.toolbar legend { float:left; margin-right:6px; color:var(--muted); }
#count { color:var(--muted); }
main { padding:8px 24px 48px; }
section.block { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 16px;
  margin:12px 0; }
section.block h2, section.group h2 { font-size:16px; margin:0 0 8px; }
.plots { display:flex; flex-wrap:wrap; gap:12px; }
.plots svg { background:#fff; border:1px solid var(--line); border-radius:6px; }
.plots text { font:11px system-ui, sans-serif; fill:var(--fg); }
.tablewrap { max-height:320px; overflow:auto; border:1px solid var(--line); border-radius:6px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:3px 8px; border-bottom:1px solid #eceef1; text-align:right; white-space:nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align:left; }
thead th { position:sticky; top:0; background:#eef1f5; }
th button { all:unset; cursor:pointer; font-weight:600; }
th button:focus-visible { outline:2px solid var(--accent); }
th[aria-sort=ascending] button::after { content:" \\25B2"; }
th[aria-sort=descending] button::after { content:" \\25BC"; }
td.better { color:var(--good); } td.worse { color:var(--bad); }
section#items { display:flex; flex-wrap:wrap; gap:0 14px; align-items:flex-start; }
section.group { margin:18px 0 0; flex:1 1 100%; min-width:0; }
section.group.single { flex:0 1 auto; width:min(100%, var(--card-w, 560px)); }
section.group > h2 { font-weight:600; white-space:pre-wrap; word-break:break-word; }
.groupfacts { color:var(--muted); margin:-4px 0 8px; }
.cards { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
article.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px;
  width:min(100%, var(--card-w, 560px)); }
article.card dl.facts { font-size:12px; }
article.card table.mini { font-size:12px; display:block; max-width:100%; overflow-x:auto; }
article.card h3 { font-size:14px; margin:0 0 8px; }
.viewer { position:relative; width:100%; overflow:hidden; background:#222; cursor:crosshair;
  touch-action:pan-y; user-select:none; -webkit-user-select:none; --pos:50%; }
.viewer img { position:absolute; inset:0; width:100%; height:100%; display:block; object-fit:fill;
  -webkit-user-drag:none; user-select:none; pointer-events:none; }
/* Each image only ever fills its own side: while the right (PiD) preview is still loading, its half stays dark
   instead of showing the left (VAE) image through. */
.viewer img.va { clip-path:inset(0 calc(100% - var(--pos)) 0 0); }
.viewer img.vb { clip-path:inset(0 0 0 var(--pos)); }
.viewer img.loading { visibility:hidden; }
.viewer .handle { position:absolute; top:0; bottom:0; left:var(--pos); width:2px; margin-left:-1px;
  background:#fff; box-shadow:0 0 0 1px rgba(0,0,0,.45); pointer-events:none; }
.viewer .tag { position:absolute; top:6px; padding:1px 6px; border-radius:4px; background:rgba(0,0,0,.6);
  color:#fff; font-size:12px; pointer-events:none; max-width:45%; overflow:hidden; text-overflow:ellipsis;
  white-space:nowrap; }
.viewer .ta { left:6px; } .viewer .tb { right:6px; }
.viewer .lens { position:absolute; border:1px solid #fff; box-shadow:0 0 0 1px rgba(0,0,0,.6); pointer-events:none; }
.controls { display:flex; gap:10px; align-items:center; margin:8px 0 4px; flex-wrap:wrap; }
.controls input[type=range] { flex:1 1 200px; }
.controls select { max-width:260px; font:inherit; }
ul.strip { list-style:none; display:flex; flex-wrap:wrap; gap:8px; padding:0; margin:6px 0; }
ul.strip button { all:unset; cursor:pointer; display:flex; flex-direction:column; align-items:center;
  font-size:12px; color:var(--muted); }
ul.strip button:focus-visible { outline:2px solid var(--accent); }
ul.strip img { height:72px; width:auto; border:1px solid var(--line); background:#222; }
.missing { color:var(--bad); }
.note { color:var(--muted); margin:0 0 6px; }
.links a { margin-right:12px; }
table.mini { width:auto; margin:6px 0; }
#loupe { position:fixed; z-index:20; display:flex; gap:6px; pointer-events:none; background:rgba(20,22,26,.92);
  padding:6px; border-radius:8px; box-shadow:0 6px 24px rgba(0,0,0,.35); }
#loupe[hidden] { display:none; }
#loupe figure { margin:0; }
#loupe .win { position:relative; overflow:hidden; width:__PANE__px; height:__PANE__px; background:#000; }
#loupe .win img { position:absolute; max-width:none; max-height:none; image-rendering:auto; }
#loupe figcaption { color:#fff; font-size:11px; margin-top:3px; width:__PANE__px; overflow:hidden;
  text-overflow:ellipsis; white-space:nowrap; }
ul.warnings { color:#8a5a00; }
footer { color:var(--muted); padding:0 24px 24px; }
""".replace("__PANE__", str(LOUPE_PANE_CSS_PX))

JS = """
(function () {
  "use strict";
  var PANE = __PANE__;
  var loupe = document.getElementById("loupe");
  var panes = { a: loupe.querySelector('[data-side="a"]'), b: loupe.querySelector('[data-side="b"]') };
  var magnifier = document.getElementById("mag");
  var fullImages = new Map();   // url -> {state: "loading" | "ok" | "error", img}
  var active = null;            // {card, fx, fy, cx, cy}: where the pointer is
  var dragging = null;

  function panels(card) {
    if (!card._panels) card._panels = JSON.parse(card.getAttribute("data-panels"));
    return card._panels;
  }
  function clamp01(v) { return Math.min(1, Math.max(0, v)); }

  function setPos(card, frac) {
    frac = clamp01(frac);
    card.querySelector(".viewer").style.setProperty("--pos", (frac * 100).toFixed(3) + "%");
    var range = card.querySelector("input.pos");
    if (range) range.value = String(Math.round(frac * 1000));
  }

  function show(card, side, index) {
    var p = panels(card)[index];
    if (!p || !p.src) return;
    card.setAttribute("data-" + side, String(index));
    var img = card.querySelector(side === "a" ? "img.va" : "img.vb");
    if (img.getAttribute("src") !== p.src) {
      // hidden until the new image has loaded: never the old picture under the new label
      img.classList.add("loading");
      img.onload = img.onerror = function () { img.classList.remove("loading"); };
      img.src = p.src;
    }
    img.alt = p.label;
    card.querySelector(side === "a" ? ".ta" : ".tb").textContent = p.label;
    var select = card.querySelector('select.pick[data-side="' + side + '"]');
    if (select) select.value = String(index);
    if (active && active.card === card) drawLoupe();
  }

  // Full-size files are fetched only when the magnifier first needs them.
  function full(url) {
    var entry = fullImages.get(url);
    if (entry) return entry;
    entry = { state: "loading", img: new Image() };
    fullImages.set(url, entry);
    entry.img.onload = function () { entry.state = "ok"; if (active) drawLoupe(); };
    entry.img.onerror = function () { entry.state = "error"; if (active) drawLoupe(); };
    entry.img.src = url;
    return entry;
  }

  function drawLoupe() {
    if (!active || !magnifier.checked) { loupe.hidden = true; return; }
    var card = active.card;
    var W = Number(card.dataset.w), H = Number(card.dataset.h);
    var d = window.devicePixelRatio || 1;
    // 1:1: one pixel of the largest image per device pixel; smaller images (the VAE) are upscaled to it.
    var px = Math.min(W - 1, Math.floor(active.fx * W)), py = Math.min(H - 1, Math.floor(active.fy * H));
    ["a", "b"].forEach(function (side) {
      var p = panels(card)[Number(card.getAttribute("data-" + side))];
      var pane = panes[side], img = pane.querySelector("img");
      var entry = full(p.full);
      var url = entry.state === "ok" ? p.full : p.src;
      if (img.getAttribute("src") !== url) img.setAttribute("src", url);
      img.style.width = (W / d) + "px";
      img.style.height = (H / d) + "px";
      img.style.left = ((Math.round(PANE * d / 2) - px) / d) + "px";
      img.style.top = ((Math.round(PANE * d / 2) - py) / d) + "px";
      pane.setAttribute("data-state", entry.state === "ok" ? "full" : entry.state === "error" ? "error" : "preview");
      pane.setAttribute("data-px", px + "," + py);
      var note = entry.state === "ok" ? (p.w >= W ? "1:1" : "upscaled x" + (W / p.w).toFixed(2))
        : entry.state === "error" ? "full size failed to load" : "loading full size...";
      pane.querySelector("figcaption").textContent = p.label + " \\u00b7 " + note;
    });
    loupe.hidden = false;
    var box = loupe.getBoundingClientRect();
    var left = active.cx + 24, top = active.cy + 24;
    if (left + box.width > window.innerWidth - 4) left = active.cx - 24 - box.width;
    if (top + box.height > window.innerHeight - 4) top = active.cy - 24 - box.height;
    // whole device pixels, or the browser would resample the magnified pixels
    loupe.style.left = Math.round(Math.max(4, left) * d) / d + "px";
    loupe.style.top = Math.round(Math.max(4, top) * d) / d + "px";
    var viewer = card.querySelector(".viewer"), lens = viewer.querySelector(".lens");
    var rect = viewer.getBoundingClientRect();
    var lw = PANE * d / W * rect.width, lh = PANE * d / H * rect.height;
    lens.style.width = lw + "px";
    lens.style.height = lh + "px";
    lens.style.left = (active.fx * rect.width - lw / 2) + "px";
    lens.style.top = (active.fy * rect.height - lh / 2) + "px";
    lens.hidden = false;
  }

  function hideLoupe() {
    if (active) active.card.querySelector(".lens").hidden = true;
    active = null;
    loupe.hidden = true;
  }

  function where(viewer, event) {
    var rect = viewer.getBoundingClientRect();
    return { fx: clamp01((event.clientX - rect.left) / rect.width), fy: clamp01((event.clientY - rect.top) / rect.height) };
  }

  document.querySelectorAll("article.card").forEach(function (card) {
    var viewer = card.querySelector(".viewer");
    if (!viewer) return;
    viewer.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) return;
      dragging = card;
      setPos(card, where(viewer, e).fx);
      e.preventDefault();
      // keep the drag when the pointer leaves the image (throws for a pointer that is no longer active)
      try { viewer.setPointerCapture(e.pointerId); } catch (err) { /* drag without capture */ }
    });
    viewer.addEventListener("pointermove", function (e) {
      var f = where(viewer, e);
      if (dragging === card) setPos(card, f.fx);
      if (active && active.card !== card) hideLoupe();
      active = { card: card, fx: f.fx, fy: f.fy, cx: e.clientX, cy: e.clientY };
      drawLoupe();
    });
    viewer.addEventListener("pointerup", function () { dragging = null; });
    viewer.addEventListener("pointercancel", function () { dragging = null; });
    viewer.addEventListener("pointerleave", hideLoupe);
    viewer.addEventListener("dragstart", function (e) { e.preventDefault(); });
    var range = card.querySelector("input.pos");
    range.addEventListener("input", function () { setPos(card, Number(range.value) / 1000); });
    card.querySelectorAll("select.pick").forEach(function (select) {
      select.addEventListener("change", function () { show(card, select.dataset.side, Number(select.value)); });
    });
    card.querySelectorAll("button.thumb").forEach(function (button) {
      button.addEventListener("click", function (e) { show(card, e.shiftKey ? "a" : "b", Number(button.dataset.i)); });
    });
  });
  magnifier.addEventListener("change", function () { if (!magnifier.checked) hideLoupe(); });
  var size = document.getElementById("size");
  function applySize() { document.body.style.setProperty("--card-w", size.value); hideLoupe(); }
  size.addEventListener("change", applySize);
  applySize();
  window.addEventListener("scroll", function () { if (active) hideLoupe(); }, { passive: true });

  // Filters: tag checkboxes (step or sigma) and free text; groups with nothing left are hidden too.
  var search = document.getElementById("q");
  var tags = Array.prototype.slice.call(document.querySelectorAll("input.f-tag"));
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr[data-tag]"));
  var groups = Array.prototype.slice.call(document.querySelectorAll("section.group"));
  function visible(el, on, terms) {
    var text = el.getAttribute("data-text") || "";
    return on.has(el.getAttribute("data-tag")) && terms.every(function (t) { return text.indexOf(t) >= 0; });
  }
  function applyFilters() {
    var on = new Set(tags.filter(function (t) { return t.checked; }).map(function (t) { return t.value; }));
    var terms = search.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var shown = 0;
    cards.forEach(function (card) { card.hidden = !visible(card, on, terms); if (!card.hidden) shown += 1; });
    rows.forEach(function (row) { row.hidden = !visible(row, on, terms); });
    groups.forEach(function (g) { g.hidden = !g.querySelector("article.card:not([hidden])"); });
    document.getElementById("count").textContent = "showing " + shown + " of " + cards.length;
    hideLoupe();
  }
  search.addEventListener("input", applyFilters);
  tags.forEach(function (t) { t.addEventListener("change", applyFilters); });
  applyFilters();

  // Sortable tables: numbers by data-v (Infinity sorts as the largest, blanks last), text otherwise.
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    heads.forEach(function (th, column) {
      var button = th.querySelector("button");
      if (!button) return;
      button.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var numeric = th.getAttribute("data-type") === "num";
        var body = table.tBodies[0];
        var list = Array.prototype.slice.call(body.rows);
        function key(row) {
          var cell = row.cells[column];
          var raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
          return numeric ? parseFloat(raw) : raw.toLowerCase();
        }
        list.sort(function (r1, r2) {
          var a = key(r1), b = key(r2);
          if (numeric) {
            var na = isNaN(a), nb = isNaN(b);
            if (na || nb) return (na ? 1 : 0) - (nb ? 1 : 0);
          }
          var order = a < b ? -1 : a > b ? 1 : 0;
          return ascending ? order : -order;
        });
        list.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
""".replace("__PANE__", str(LOUPE_PANE_CSS_PX))
