"""PiD decode benchmark: latency and peak memory of one decode, beside the native VAE decode.

    python benchmarks/decode.py                                    # CUDA: official network, 2048² ... 8192²
    python benchmarks/decode.py --device cpu --config tiny         # seconds on a small CPU
    python benchmarks/decode.py --reference /path/to/PiD           # ours vs the reference network

The networks have random weights (`build_pid_net(config)`): latency and memory do not depend on
the weight values. Captions are random [B, 300, text_dim] embeddings (the caption encoder is not
timed). Latency: median of --runs decodes after --warmup, synchronised on CUDA. Peak memory:
one extra decode from a cold positional-table cache, measured as bytes allocated above the level
before it (`torch.cuda.max_memory_allocated` on CUDA; the CPU allocator's events, via the torch
profiler, on CPU), printed beside `pid.memory`'s estimate. Sizes whose untiled estimate exceeds
the free memory are decoded tiled (`pid.tiling.decode_tiled`). Writes JSON and a markdown table.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from pid.decoder import PiDDecoder  # noqa: E402
from pid.memory import (  # noqa: E402
    GiB,
    choose_pixel_chunk,
    estimate_decode_memory,
    free_memory_bytes,
    track_peak_memory,
)
from pid.models import PiDNet, PiDNetConfig, build_pid_net, get_net_config  # noqa: E402
from pid.sampling import distilled_schedule  # noqa: E402
from pid.tiling import (  # noqa: E402
    DEFAULT_OVERLAP,
    DEFAULT_TILE_SIZE,
    decode_tiled,
    estimate_tiled_decode_memory,
)

# Shrunk networks of the released layout, for CPUs (same adapter kind and patch size).
SMALL_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        num_heads=4,
        patch_depth=4,
        pixel_hidden_size=8,
        pixel_attn_hidden_size=32,
        pixel_num_heads=2,
        text_dim=32,
        adapter_width=32,
    ),
    "medium": dict(
        hidden_size=384,
        num_heads=6,
        patch_depth=6,
        pixel_hidden_size=16,
        pixel_attn_hidden_size=288,
        pixel_num_heads=4,
        text_dim=256,
        adapter_width=128,
    ),
}
GPU_SIZES = "2048x2048,2304x1728,4096x4096,8192x8192"
CPU_SIZES = {"tiny": "128x128,256x256", "medium": "128x128,256x256", "official": "128x128"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument(
        "--config",
        choices=["tiny", "medium", "official"],
        help="network size (default: official on CUDA, tiny on CPU)",
    )
    p.add_argument(
        "--net-config", default="v1_latent16ch", help="released network layout (pid.models.NET_CONFIGS)"
    )
    p.add_argument("--sizes", help=f"output sizes HxW, comma-separated (CUDA default {GPU_SIZES})")
    p.add_argument(
        "--batch",
        default=None,
        help="batch sizes, comma-separated (default 1,4 on CUDA; 1,2 for tiny and 1 otherwise on CPU)",
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=None, help="timed runs per case (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the network (warm-up includes compiling)"
    )
    p.add_argument(
        "--bf16-weights", action="store_true", help="bf16 weights (autocast), instead of fp32 + autocast"
    )
    p.add_argument(
        "--chunk", default=None, help="PiT pixel chunk in patch tokens, or 'auto' (fit the free memory)"
    )
    p.add_argument(
        "--tile", type=int, default=None, help="always decode tiled with this tile size (output px)"
    )
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tile overlap (output px)")
    p.add_argument("--no-vae", action="store_true", help="skip the native FLUX.1 VAE decode")
    p.add_argument(
        "--reference", type=Path, help="checkout of nv-tlabs/PiD: time its network on the same inputs"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for decode_benchmark.{json,md} (default: a new folder under $XDG_CACHE_HOME/pid/benchmarks)",
    )
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.config = args.config or ("official" if cuda else "tiny")
    args.sizes = _parse_sizes(args.sizes or (GPU_SIZES if cuda else CPU_SIZES[args.config]))
    default_batch = "1,4" if cuda else ("1,2" if args.config == "tiny" else "1")  # CPU: under a minute
    args.batch = [int(b) for b in (args.batch or default_batch).split(",")]
    args.runs = args.runs or (5 if cuda else 3)
    return args


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().lower().partition("x")
        sizes.append((int(h), int(w or h)))
    return sizes


def net_config(args: argparse.Namespace) -> PiDNetConfig:
    base = get_net_config(args.net_config)
    return base if args.config == "official" else replace(base, **SMALL_CONFIGS[args.config])


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(
            gpu=prop.name,
            gpu_memory_gib=round(prop.total_memory / GiB, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], Any], device: torch.device, warmup: int, runs: int) -> dict[str, Any]:
    """Seconds of `runs` calls after `warmup` calls (the first warm-up call timed on its own)."""
    first = None
    for i in range(warmup):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times, "first_call_s": first}


def peak_memory(fn: Callable[[], Any], device: torch.device, net: torch.nn.Module | None = None) -> int:
    """Bytes allocated by one call above the level before it, from a cold positional-table cache."""
    if isinstance(net, PiDNet):
        net._pos_cache.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with track_peak_memory(device) as peak:
        fn()
    return peak.peak_bytes


def _resident_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _time_and_peak(run, device: torch.device, args) -> dict:
    """Latency and activation peak of `run`, or {"error": "out of memory"} (reported, not raised)."""
    try:
        res = time_runs(run, device, args.warmup, args.runs)
        res["peak_activation_bytes"] = peak_memory(run, device)
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": "out of memory"}
    return res


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------


def plan_case(
    cfg: PiDNetConfig,
    size: tuple[int, int],
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    wdtype,
) -> dict[str, Any]:
    """Untiled / chunked / tiled, from the flags and the memory estimate against free memory."""
    act = torch.bfloat16 if device.type == "cuda" or wdtype == torch.bfloat16 else torch.float32
    free = free_memory_bytes(device)
    plan: dict[str, Any] = {"mode": "full", "chunk": None, "tile": None, "free_bytes": free}
    chunk: int | None = None
    if args.chunk == "auto":
        try:
            chunk = choose_pixel_chunk(cfg, *size, batch, free, wdtype, act)
        except ValueError:
            chunk = None  # does not fit even chunked: tiled below
    elif args.chunk:
        chunk = int(args.chunk)
    est = estimate_decode_memory(cfg, *size, batch, wdtype, act, chunk)
    tile = args.tile
    if tile is None and est.activation_peak_bytes > free:
        tile = DEFAULT_TILE_SIZE  # "tiled where needed"
    if tile is not None and tile < max(size):
        est = estimate_tiled_decode_memory(cfg, *size, tile, batch, wdtype, act, chunk)
        plan.update(mode="tiled", tile=tile, overlap=args.overlap)
    elif chunk is not None:
        plan["mode"] = "chunked"
    plan["chunk"] = chunk
    plan["estimate_activation_bytes"] = est.activation_peak_bytes
    plan["estimate_total_bytes"] = est.total_bytes
    plan["estimate_peak_phase"] = est.peak_phase
    plan["fits"] = est.activation_peak_bytes <= free
    return plan


def bench_pid(
    decoder: PiDDecoder,
    cfg: PiDNetConfig,
    size: tuple[int, int],
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    wdtype: torch.dtype,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    stride = cfg.output_stride
    if size[0] % stride or size[1] % stride:
        raise ValueError(f"size {size[0]}x{size[1]} is not a multiple of the latent stride {stride}")
    gen = torch.Generator().manual_seed(args.seed)
    latent = torch.randn(batch, cfg.latent_channels, size[0] // stride, size[1] // stride, generator=gen)
    embeds = torch.randn(batch, cfg.text_max_length, cfg.text_dim, generator=gen)
    latent, embeds = latent.to(device), embeds.to(device)
    plan = plan_case(cfg, size, batch, args, device, wdtype)
    row: dict[str, Any] = {"size": f"{size[0]}x{size[1]}", "batch": batch, **plan}
    if not plan["fits"]:
        row["skipped"] = (
            f"estimated {plan['estimate_activation_bytes'] / GiB:.1f} GiB > free {plan['free_bytes'] / GiB:.1f} GiB"
        )
        return row, latent, embeds, None
    decoder.set_pixel_chunking(plan["chunk"])
    out: list[torch.Tensor] = []

    def run() -> None:
        if plan["mode"] == "tiled":
            img = decode_tiled(
                decoder,
                latent,
                plan["tile"],
                plan["overlap"],
                caption_embeds=embeds,
                steps=args.steps,
                seed=args.seed,
            )
        else:
            img = decoder.decode(latent, caption_embeds=embeds, steps=args.steps, seed=args.seed)
        out[:] = [img]

    try:
        row.update(time_runs(run, device, args.warmup, args.runs))
        row["peak_activation_bytes"] = peak_memory(run, device, decoder.net)
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        row["error"] = "out of memory"
        out.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row, latent, embeds, None
    finally:
        decoder.set_pixel_chunking(None)
    row["weights_bytes"] = _resident_bytes(decoder.net)
    row["peak_total_bytes"] = row["weights_bytes"] + row["peak_activation_bytes"]
    row["estimate_over_measured"] = plan["estimate_activation_bytes"] / max(1, row["peak_activation_bytes"])
    row["per_image_s"] = row["median_s"] / batch
    row["megapixels_per_s"] = batch * size[0] * size[1] / 1e6 / row["median_s"]
    return row, latent, embeds, out[0] if out else None


def build_vae(device: torch.device):
    """Random-weight diffusers AutoencoderKL with the FLUX.1 VAE config (no download)."""
    try:
        from diffusers import AutoencoderKL

        from pid.latents.flux import FLUX1_VAE_CONFIG
    except ImportError:
        return None
    config = {k: v for k, v in FLUX1_VAE_CONFIG.items() if k != "force_upcast"}
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**config).eval().requires_grad_(False)
    # FLUX pipelines decode in bf16 on GPUs; fp32 on CPU. (Parameters cast in place: `.to(dtype)`
    # on a diffusers model logs a warning about from_pretrained.)
    if device.type == "cuda":
        for param in vae.parameters():
            param.data = param.data.to(torch.bfloat16)
    return vae


def bench_vae(vae, latent: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = vae.config
    z = (latent / cfg.scaling_factor + cfg.shift_factor).to(vae.dtype)

    @torch.no_grad()
    def run() -> None:
        vae.decode(z, return_dict=False)

    res = _time_and_peak(run, device, args)
    if "error" in res:
        return res
    res["output"] = f"{latent.shape[-2] * 8}x{latent.shape[-1] * 8}"
    return res


# ----------------------------------------------------------------------------------------------
# Reference network (nv-tlabs/PiD checkout provided by the user; never vendored)
# ----------------------------------------------------------------------------------------------


def load_reference_class(path: Path) -> type:
    """The reference `PidNet` class from a checkout, with its training-only imports stubbed.

    The reference package is also called `pid`: its modules are loaded by file path under their
    own `pid._src.*` names, which this package does not use, so both coexist in one process.
    """
    net_dir = path / "pid" / "_src" / "networks"
    if not (net_dir / "pid_net.py").is_file():
        raise FileNotFoundError(f"{path} is not a PiD checkout (no pid/_src/networks/pid_net.py)")

    class _Quiet:
        def __getattr__(self, name: str) -> Callable[..., None]:
            return lambda *a, **k: None

    def module(name: str, package: bool = True) -> types.ModuleType:
        mod = sys.modules.get(name) or types.ModuleType(name)
        if package and not hasattr(mod, "__path__"):
            mod.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = mod
        return mod

    for name in ["pid._ext", "pid._ext.imaginaire", "pid._src", "pid._src.networks", "pid._src.utils"]:
        module(name)
    utils = module("pid._ext.imaginaire.utils")
    utils.log = _Quiet()  # type: ignore[attr-defined]
    utils.distributed = _Quiet()  # type: ignore[attr-defined]
    cp = module("pid._src.utils.context_parallel", package=False)
    cp.cat_outputs_cp_with_grad = lambda *a, **k: None  # type: ignore[attr-defined]
    cp.split_inputs_cp = lambda *a, **k: None  # type: ignore[attr-defined]
    loaded = None
    for name in ["pixeldit_official", "lq_projection_2d", "pid_net"]:
        spec = importlib.util.spec_from_file_location(f"pid._src.networks.{name}", net_dir / f"{name}.py")
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
    return loaded.PidNet  # type: ignore[union-attr]


def reference_kwargs(cfg: PiDNetConfig) -> dict[str, Any]:
    """The reference constructor arguments of a config (cf. tests/data/manifests/*.json)."""
    return dict(
        in_channels=cfg.in_channels,
        num_groups=cfg.num_heads,
        hidden_size=cfg.hidden_size,
        pixel_hidden_size=cfg.pixel_hidden_size,
        pixel_attn_hidden_size=cfg.pixel_attn_hidden_size,
        pixel_num_groups=cfg.pixel_num_heads,
        patch_depth=cfg.patch_depth,
        pixel_depth=cfg.pixel_depth,
        patch_size=cfg.patch_size,
        txt_embed_dim=cfg.text_dim,
        txt_max_length=cfg.text_max_length,
        use_text_rope=True,
        text_rope_theta=cfg.text_rope_theta,
        rope_mode="ntk_aware",
        rope_ref_h=cfg.rope_ref_size,
        rope_ref_w=cfg.rope_ref_size,
        enable_ed=False,
        lq_inject_mode="controlnet",
        lq_in_channels=0,
        lq_latent_channels=cfg.latent_channels,
        lq_hidden_dim=cfg.adapter_width,
        lq_num_res_blocks=cfg.adapter_res_blocks,
        lq_latent_unpatchify_factor=cfg.latent_unpatchify,
        lq_aux_rgb_head=cfg.aux_rgb_head,
        lq_conv_padding_mode=cfg.adapter_padding,
        lq_gate_type="sigma_aware_per_token_per_dim" if cfg.gate == "per_dim" else "sigma_aware_per_token",
        lq_interval=cfg.inject_interval,
        sr_scale=cfg.sr_scale,
        latent_spatial_down_factor=cfg.latent_downsample,
        pit_lq_inject=cfg.pit_inject,
    )


def build_reference(path: Path, ours: PiDNet, device: torch.device) -> torch.nn.Module:
    """The reference network with our (random) weights: the same tensors under the same names."""
    cls = load_reference_class(path)
    with torch.device(device):  # built in place (its own init runs there), then overwritten
        ref = cls(**reference_kwargs(ours.cfg))
    ref.load_state_dict(ours.state_dict(), strict=True)  # copied into its fp32 master weights
    return ref.float().eval().requires_grad_(False)


def reference_decode(
    ref: torch.nn.Module,
    latent: torch.Tensor,
    embeds: torch.Tensor,
    steps: int,
    seed: int,
    size: tuple[int, int],
    autocast: bool,
) -> torch.Tensor:
    """The reference's distilled loop (network re-run on the latent every step, x0 in float64),
    with the noise drawn like `PiDDecoder.decode` so both decode identical inputs."""
    device = latent.device
    batch = latent.shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((batch, 3, *size), generator=gen, device=device)
    lat = latent.to(torch.bfloat16).float() if autocast else latent
    sigma = torch.zeros(batch, device=device)
    schedule = distilled_schedule(steps)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        for t_cur, t_next in zip(schedule[:-1], schedule[1:]):
            t = torch.full((batch,), t_cur, device=device) * 1000.0
            v = ref(x, t, embeds, lq_latent=lat, degrade_sigma=sigma)
            v = v[0] if isinstance(v, (tuple, list)) else v
            x0 = (x.double() - t_cur * v.double()).float()
            if t_next > 0:
                eps = torch.randn(x.shape, generator=gen, device=device)
                x = (1.0 - t_next) * x0 + t_next * eps
    return ((x0.clamp(-1, 1) + 1) / 2).float()


def bench_reference(
    ref: torch.nn.Module,
    ours_row: dict[str, Any],
    ours_image: torch.Tensor | None,
    latent: torch.Tensor,
    embeds: torch.Tensor,
    size: tuple[int, int],
    args: argparse.Namespace,
    device: torch.device,
    autocast: bool,
) -> dict[str, Any]:
    out: list[torch.Tensor] = []

    def run() -> None:
        out[:] = [reference_decode(ref, latent, embeds, args.steps, args.seed, size, autocast)]

    res = _time_and_peak(run, device, args)
    if "error" in res:
        return res
    res["peak_total_bytes"] = _resident_bytes(ref) + res["peak_activation_bytes"]
    if "median_s" in ours_row:
        res["time_ratio_ours_over_ref"] = ours_row["median_s"] / res["median_s"]
        res["peak_ratio_ours_over_ref"] = ours_row["peak_total_bytes"] / res["peak_total_bytes"]
        res["activation_ratio_ours_over_ref"] = ours_row["peak_activation_bytes"] / max(
            1, res["peak_activation_bytes"]
        )
    if ours_image is not None and out:
        res["max_abs_diff_vs_ours"] = float((out[0] - ours_image).abs().max())
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _gib(value: Any) -> str:
    return f"{value / GiB:.2f}" if isinstance(value, (int, float)) else "–"


def _sec(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def markdown(report: dict[str, Any]) -> str:
    env, conf = report["environment"], report["settings"]
    hw = env.get("gpu") or f"{env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} torch threads)"
    lines = [
        "# PiD decode benchmark",
        "",
        f"- hardware: {hw}" + (f", {env['gpu_memory_gib']} GiB" if "gpu" in env else ""),
        f"- torch {env['torch']}, python {env['python']}, git {str(env['git_commit'])[:12]}"
        + (" (dirty)" if env["git_dirty"] else ""),
        f"- network: {conf['config']} ({conf['net_config']}, {conf['parameters'] / 1e6:.1f} M parameters, "
        f"{conf['weights']} weights, {conf['activations']} activations), {conf['steps']} steps, "
        f"median of {conf['runs']} runs after {conf['warmup']} warm-up"
        + (", torch.compile" if conf["compile"] else ""),
        "",
        "| size | batch | mode | PiD s | s / image | peak act. GiB | peak total GiB | est. / meas. "
        "| VAE s | VAE peak GiB | PiD / VAE time |"
        + (" ref s | ours / ref time | ours / ref peak (act.) | max abs diff |" if conf["reference"] else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if conf["reference"] else ""),
    ]
    for r in report["results"]:
        mode = r.get("mode", "")
        if mode == "tiled":
            mode = f"tiled {r['tile']}/{r['overlap']}"
        if r.get("chunk"):
            mode += f" chunk {r['chunk']}"
        note = r.get("skipped") or r.get("error")
        vae = r.get("vae", {})
        ratio = r["median_s"] / vae["median_s"] if "median_s" in r and "median_s" in vae else None
        cells = [
            r["size"],
            str(r["batch"]),
            mode + (f" ({note})" if note else ""),
            _sec(r.get("median_s")),
            _sec(r.get("per_image_s")),
            _gib(r.get("peak_activation_bytes")),
            _gib(r.get("peak_total_bytes")),
            f"{r['estimate_over_measured']:.2f}" if "estimate_over_measured" in r else "–",
            _sec(vae.get("median_s")),
            _gib(vae.get("peak_activation_bytes")),
            f"{ratio:.1f}" if ratio else "–",
        ]
        if conf["reference"]:
            ref = r.get("reference", {})
            cells += [
                _sec(ref.get("median_s")) if "error" not in ref else ref["error"],
                f"{ref['time_ratio_ours_over_ref']:.2f}" if "time_ratio_ours_over_ref" in ref else "–",
                f"{ref['peak_ratio_ours_over_ref']:.2f} ({ref['activation_ratio_ours_over_ref']:.2f})"
                if "peak_ratio_ours_over_ref" in ref
                else "–",
                f"{ref['max_abs_diff_vs_ours']:.2e}" if "max_abs_diff_vs_ours" in ref else "–",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Peak act.: bytes one decode allocates above the weights (cold positional-table cache); "
        "total adds the weights. est. / meas.: `pid.memory` estimate over the measured activation peak. "
        "VAE: random-weight FLUX.1 AutoencoderKL on the same latent (output 1/4 of PiD's side). "
        "ref: the reference network on identical inputs and weights; peak ratio of totals (of activations).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference loader's settings
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = net_config(args)
    wdtype = torch.bfloat16 if args.bf16_weights else torch.float32
    torch.manual_seed(args.seed)
    net = build_pid_net(cfg, device=device, dtype=wdtype)
    decoder = PiDDecoder(net)  # no record: a distilled decoder; captions come as embeddings
    if args.compile:
        decoder.compile()
    vae = None if args.no_vae else build_vae(device)
    ref = build_reference(args.reference, net, device) if args.reference else None

    results = []
    for size in args.sizes:
        for batch in args.batch:
            row, latent, embeds, image = bench_pid(decoder, cfg, size, batch, args, device, wdtype)
            if vae is not None:
                row["vae"] = bench_vae(vae, latent, args, device)
            if ref is not None:
                if "median_s" in row and row["mode"] != "tiled":
                    row["reference"] = bench_reference(
                        ref, row, image, latent, embeds, size, args, device, decoder.uses_autocast
                    )
                else:
                    row["reference"] = {"error": "not run (ours tiled or failed)"}
            results.append(row)
            print(_summary(row), flush=True)
            del latent, embeds, image
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report = {
        "environment": environment(device),
        "settings": {
            "config": args.config,
            "net_config": cfg.name,
            "parameters": sum(p.numel() for p in net.parameters()),
            "weights": str(wdtype).removeprefix("torch."),
            "activations": "bf16 autocast" if decoder.uses_autocast else "fp32",
            "device": str(device),
            "steps": args.steps,
            "runs": args.runs,
            "warmup": args.warmup,
            "compile": args.compile,
            "chunk": args.chunk,
            "tile": args.tile,
            "overlap": args.overlap,
            "reference": str(args.reference) if args.reference else None,
            "argv": list(argv) if argv is not None else sys.argv[1:],
        },
        "results": results,
    }
    args.out = args.out or default_out_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_benchmark.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (args.out / "decode_benchmark.md").write_text(md)
    print(md)
    print(f"written: {args.out / 'decode_benchmark.json'} and decode_benchmark.md")
    return report


def default_out_dir() -> Path:
    """A fresh folder outside the checkout: $XDG_CACHE_HOME/pid/benchmarks/<UTC time> (~/.cache by default),
    so a benchmark run leaves the working tree clean and never overwrites an earlier result."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return cache / "pid" / "benchmarks" / stamp


def _summary(row: dict[str, Any]) -> str:
    head = f"{row['size']} x{row['batch']} {row['mode']}"
    if "median_s" not in row:
        return f"{head}: {row.get('skipped') or row.get('error')}"
    return (
        f"{head}: {row['median_s']:.3f} s, peak {row['peak_activation_bytes'] / GiB:.2f} GiB above weights "
        f"(estimate x{row['estimate_over_measured']:.2f})"
    )


if __name__ == "__main__":
    main()
