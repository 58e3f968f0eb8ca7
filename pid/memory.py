"""Peak-memory estimate of one PiD decode, pixel-chunk choice, free memory, and a measuring helper.

    est = estimate_decode_memory(cfg, 4096, 4096, activation_dtype=torch.bfloat16)
    print(est)                                   # weights, activation peak, the phase that sets it
    chunk = choose_pixel_chunk(cfg, 4096, 4096, 1, free_memory_bytes("cuda"))
    decoder.set_pixel_chunking(chunk)            # None: fits unchunked

The model follows the tensors that `PiDNet.forward` and the samplers keep alive (see the comments
below), not a fitted constant, so it scales with every config field. It counts allocated bytes:
a CUDA caching allocator reserves somewhat more (fragmentation, the CUDA context, cuBLAS
workspaces), which `choose_pixel_chunk` leaves as `headroom`. It assumes a fused SDPA kernel
(flash / memory-efficient / CPU flash), i.e. no [N, N] attention matrix is ever materialised.

Phases of one decode, each adding a transient on top of what stays resident for the whole decode
(weights, sampler images, caption embeddings, adapter features, cached positional tables):
adapter (once), trunk (MMDiT attention or SwiGLU, whichever is larger), pixel (PiT per-pixel
modulation + MLP; divided by chunking), sampler update (float64 x0 arithmetic).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from pid.errors import ConfigError
from pid.models.configs import PiDNetConfig

GiB = 1024**3
FP32 = 4  # residual streams, norms, RoPE'd q/k and the sampler state are fp32 in every recipe


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one decode, in bytes.

    activation_peak_bytes: everything the decode allocates on top of the weights (positional
    tables cached on first use at this size included). breakdown: the resident parts and the
    transient of every phase (`phase:*`); the peak is resident + the largest phase transient.
    """

    weights_bytes: int
    activation_peak_bytes: int
    total_bytes: int
    peak_phase: str
    breakdown: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.breakdown.items())
        return (
            f"total {self.total_bytes / GiB:.2f} GiB = weights {self.weights_bytes / GiB:.2f} + activations "
            f"{self.activation_peak_bytes / GiB:.2f} (peak in {self.peak_phase}; GiB: {parts})"
        )


@lru_cache(maxsize=32)
def parameter_count(cfg: PiDNetConfig) -> int:
    """Exact parameter count of the network for `cfg` (built weightless on the meta device)."""
    from pid.models import build_pid_net

    return sum(p.numel() for p in build_pid_net(cfg, device="meta").parameters())


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def estimate_decode_memory(
    cfg: PiDNetConfig,
    height: int,
    width: int,
    batch: int = 1,
    weight_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype = torch.bfloat16,
    pixel_chunk_tokens: int | None = None,
    cfg_batch: int = 1,
    text_len: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one `PiDDecoder.decode` of `batch` images of height x width.

    activation_dtype: bfloat16 under autocast (CUDA, or bf16 weights), float32 for plain fp32
    (CPU). pixel_chunk_tokens: as `PiDDecoder.set_pixel_chunking`. cfg_batch: 2 for undistilled
    decoders with text CFG (both branches run as one network batch). text_len: caption tokens the
    network sees (default `cfg.text_max_length`, what the Gemma encoder pads to).
    """
    patch = cfg.patch_size
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ConfigError(f"output size {height}x{width} must be a positive multiple of {patch}")
    if batch < 1 or cfg_batch < 1:
        raise ConfigError(f"batch and cfg_batch must be >= 1, got {batch} and {cfg_batch}")
    a = _dtype_size(activation_dtype)  # bytes per element of Linear / conv / SDPA outputs
    autocast = a < FP32
    nb = batch * cfg_batch  # network batch
    pixels = height * width
    tokens = pixels // (patch * patch)
    n_text = min(cfg.text_max_length, cfg.text_max_length if text_len is None else text_len)
    dim, mlp, cp, pp, da = (
        cfg.hidden_size,
        cfg.mlp_hidden,
        cfg.pixel_hidden_size,
        patch * patch,
        cfg.pixel_attn_hidden_size,
    )
    image = 3 * pixels * FP32  # one fp32 [1, 3, H, W]

    weights = parameter_count(cfg) * _dtype_size(weight_dtype)

    # --- resident for the whole decode ------------------------------------------------------
    # Distilled sampler during a network call: initial noise, x, previous x0, previous eps, previous v;
    # with CFG also the [2B] network input torch.cat([x, x]).
    sampler_state = 5 * batch * image + (nb * image if cfg_batch > 1 else 0)
    caption = (nb + (1 if cfg_batch > 1 else 0)) * n_text * cfg.text_dim * FP32
    # Adapter features are computed once per decode: K heads (+ the PiT head) [B, L, D]; CFG
    # concatenates a second copy for every call.
    heads = cfg.num_injections + int(cfg.pit_inject)
    features = heads * tokens * dim * a * (batch + (nb if cfg_batch > 1 else 0))
    # Cached per size: the fp32 pixel sin-cos table [H, W, Cp] and the RoPE cos/sin tables.
    head, pixel_head = dim // cfg.num_heads, da // cfg.pixel_num_heads
    rope = 2 * FP32 * ((tokens * (head + pixel_head) + n_text * head) // 2)
    pos_tables = pixels * cp * FP32 + rope

    # --- transients of each phase -----------------------------------------------------------
    # Weight casts: under autocast fp32 weights are cast to bf16 per call (uncached, as the
    # weights do not require grad); the largest matrix of a phase adds one bf16 copy.
    def cast(numel: int) -> int:
        return 2 * numel if autocast and _dtype_size(weight_dtype) == FP32 else 0

    grid_tokens = nb * tokens
    # Adapter CNN on the [Dl, Hs, Ws] grid: a residual block keeps about four feature maps alive.
    adapter = 4 * FP32 * cfg.adapter_width * grid_tokens

    # Patch trunk, per token of the joint [text, image] sequence (the largest of three moments):
    # attention: x, modulated x, qkv, RoPE'd q and k, the concatenated q/k/v, their bf16 casts, output;
    # SwiGLU: x, attention output (kept by the text branch), modulated x, silu(w1 x), w3 x, product;
    # the w1 call itself: the same first three, a bf16 copy of w1 and its output.
    seq = nb * (tokens + n_text)
    attn_tok = (4 + 4 + 3 * a + 8 + 8 + a + (2 * a if autocast else 0) + a) * dim
    mlp_tok = (4 + a + 4) * dim + 3 * a * mlp
    trunk = max(attn_tok * seq, mlp_tok * seq, ((4 + a + 4) * dim + a * mlp) * seq + cast(dim * mlp))

    # Pixel blocks, per pixel (units of Cp elements): block input z, the six modulation chunks [6Cp],
    # the new z, the MLP input and fc1 / GELU outputs [4Cp each] at the GELU. Chunking keeps z and the
    # preallocated output whole and slices the rest (plus the previous slice's result).
    s_cond = grid_tokens * dim * FP32
    per_pixel_all = (12 + 14 * a) * cp
    total_rows = nb * tokens
    chunk = pixel_chunk_tokens if pixel_chunk_tokens and pixel_chunk_tokens < total_rows else None
    if chunk is None:
        expand = per_pixel_all * nb * pixels
    else:
        frac = chunk / total_rows
        expand = int((8 * cp + (per_pixel_all + 4 * cp) * frac) * nb * pixels)
    attn_out = a * da * grid_tokens
    # PiT attention on the compressed tokens (modulation already freed): compressed, qkv, RoPE'd q/k,
    # casts, output and its transposed copy, beside the block input z.
    pit_attn = (
        a + 3 * a + 8 + (2 * a if autocast else 0) + 2 * a
    ) * da * grid_tokens + cp * FP32 * nb * pixels
    # The adaLN call that makes the modulation also holds a bf16 copy of its [6 Cp P², D] weight.
    if chunk is None:
        modulate = (4 + 6 * a) * cp * nb * pixels
    else:
        modulate = int((8 * cp + (6 * a + 4) * cp * chunk / total_rows) * nb * pixels)
    pixel = s_cond + attn_out + max(expand, pit_attn, modulate + cast(dim * 6 * cp * pp))

    # Sampler update: (x.double() - t * v.double()).float() keeps three float64 images alive.
    sampler = 6 * batch * image
    # First call at a size: the float64 pixel table is built, then cast to fp32.
    pos_build = pixels * cp * 8

    phases = {"adapter": adapter, "trunk": trunk, "pixel": pixel, "sampler": sampler, "pos_build": pos_build}
    resident = {
        "sampler_state": sampler_state,
        "caption_embeds": caption,
        "latent_features": features,
        "positional_tables": pos_tables,
    }
    peak_phase = max(phases, key=phases.__getitem__)
    activations = sum(resident.values()) + phases[peak_phase]
    breakdown = {"weights": weights, **resident, **{f"phase:{k}": v for k, v in phases.items()}}
    return MemoryEstimate(
        weights_bytes=weights,
        activation_peak_bytes=activations,
        total_bytes=weights + activations,
        peak_phase=peak_phase,
        breakdown=breakdown,
    )


def choose_pixel_chunk(
    cfg: PiDNetConfig,
    height: int,
    width: int,
    batch: int,
    budget_bytes: int,
    weight_dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype = torch.bfloat16,
    cfg_batch: int = 1,
    count_weights: bool = False,
    headroom: float = 0.1,
) -> int | None:
    """The pixel chunk (patch tokens, for `PiDDecoder.set_pixel_chunking`) that fits `budget_bytes`.

    None when the decode fits unchunked, else the largest chunk that fits. The budget is the
    memory free for the decode: by default the weights are taken as already resident (as when
    `free_memory_bytes` is read after loading); `count_weights=True` charges them too. `headroom`
    (a fraction) is kept back for allocator fragmentation. Raises ConfigError when even a
    one-token chunk does not fit (the trunk does not chunk): tile the image instead.
    """
    usable = budget_bytes * (1.0 - headroom)

    def need(chunk: int | None) -> int:
        est = estimate_decode_memory(
            cfg, height, width, batch, weight_dtype, activation_dtype, chunk, cfg_batch
        )
        return est.total_bytes if count_weights else est.activation_peak_bytes

    if need(None) <= usable:
        return None
    rows = batch * cfg_batch * (height // cfg.patch_size) * (width // cfg.patch_size)
    if need(1) > usable:
        raise ConfigError(
            f"a {height}x{width} decode (batch {batch}) needs {need(1) / GiB:.1f} GiB even fully chunked, "
            f"more than the {usable / GiB:.1f} GiB budget; use pid.tiling.decode_tiled or a smaller batch"
        )
    lo, hi = 1, rows - 1  # need() is non-decreasing in the chunk: the largest fitting one by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory a decode on `device` may still allocate: CUDA free memory (plus what this process's
    caching allocator holds unused); elsewhere the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


@dataclass
class PeakMemory:
    """Filled in when `track_peak_memory` exits: the largest number of bytes allocated above the
    level at entry, and how it was measured."""

    peak_bytes: int = 0
    method: str = ""


@contextmanager
def track_peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak of tensor memory allocated inside the block, above the level at entry.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocation / free events the torch profiler
    records from the CPU allocator (every tensor and kernel buffer, unlike RSS, which the
    allocator's caching and the OS blur); RSS growth as a fallback where those are unavailable.
    """
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device) - start
        result.method = "torch.cuda.max_memory_allocated"
        return
    prof = _memory_profiler() if _profiler_memory_events_supported() else None
    if prof is None:
        with _rss_peak(result):
            yield result
        return
    with prof:
        yield result
    events = _profiler_memory_events(prof)
    if events is None:  # pragma: no cover - the probe passed, so only a torch bug lands here
        result.peak_bytes, result.method = 0, "unavailable (torch profiler memory events not readable)"
        return
    result.peak_bytes = _peak_of(sorted(events, key=lambda e: e.start_ns()), lambda e: e.nbytes())
    result.method = "torch.profiler CPU allocator events"


def _memory_profiler():
    try:
        from torch.profiler import ProfilerActivity, profile

        return profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    except (ImportError, RuntimeError, AttributeError):  # pragma: no cover - profiler missing in this build
        return None


def _profiler_memory_events(prof) -> list | None:
    """The allocator's "[memory]" events of a finished profile, or None where this torch does not expose
    them: `profiler.kineto_results` is private API and may change between releases."""
    try:
        return [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except (AttributeError, TypeError, RuntimeError):
        return None


@lru_cache(maxsize=1)
def _profiler_memory_events_supported() -> bool:
    """Probe once per process whether the profiler's memory events can be read (else RSS is used)."""
    prof = _memory_profiler()
    if prof is None:
        return False
    with prof:
        torch.empty(1024)
    return _profiler_memory_events(prof) is not None


def _peak_of(events: list, nbytes: Callable) -> int:
    live = peak = 0
    for event in events:
        live += nbytes(event)
        peak = max(peak, live)
    return peak


@contextmanager
def _rss_peak(result: PeakMemory) -> Iterator[None]:
    import threading

    try:
        import psutil
    except ImportError:
        yield
        result.peak_bytes, result.method = 0, "unavailable (no profiler memory events and no psutil)"
        return

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        result.peak_bytes = max(peak[0], proc.memory_info().rss) - start
        result.method = "RSS growth (psutil)"


__all__ = [
    "GiB",
    "MemoryEstimate",
    "PeakMemory",
    "choose_pixel_chunk",
    "estimate_decode_memory",
    "free_memory_bytes",
    "parameter_count",
    "track_peak_memory",
]
