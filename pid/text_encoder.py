"""Caption encoding with Gemma-2-2b-it, exactly as the PiD checkpoints were trained.

Every caption gets a fixed instruction prefix; the string is tokenised to n_prefix + 298 tokens
(right padding, truncation), run through the Gemma-2 decoder stack, and the hidden states at
position 0 (BOS) and the last 299 positions are kept: [B, 300, 2304]. The padding mask is used
inside Gemma but never given to PiD — the released networks attend to the pad positions too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor, nn

from pid.errors import CheckpointNotFoundError

DEFAULT_TEXT_ENCODER = "Efficient-Large-Model/gemma-2-2b-it"
CAPTION_TOKENS = 300

# The "CHI" instruction prefix (8 lines, newline-joined; the caption follows "User Prompt: ").
CHI_PROMPT = "\n".join(
    [
        'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
        "suitable for image generation. Evaluate the level of detail in the user prompt:",
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and "
        "spatial relationships to create vivid and concrete scenes.",
        "- If the prompt is already detailed, refine and enhance the existing details slightly without "
        "overcomplicating.",
        "Here are examples of how to transform or refine prompts:",
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
        "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
        "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by "
        "towering glass skyscrapers.",
        "Please generate only the enhanced description for the prompt below and avoid including any additional "
        "commentary or evaluations:",
        "User Prompt: ",
    ]
)

# Unconditional branch of text CFG for the undistilled checkpoints (not the empty string).
NEGATIVE_PROMPT = (
    "low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, low res, "
    "blurry, deformed, distortion, duplicated limbs, plastic skin, jpeg artifacts, watermark"
)


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off for one load (a library call prints nothing), then as it was."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class CaptionEncoder(nn.Module):
    """Gemma-2 caption encoder with PiD's prefix and token selection.

    model: a transformers Gemma2Model (decoder stack; `last_hidden_state` is used);
    tokenizer: its tokenizer (adds BOS by default, as Gemma's does).
    Encodings are memoised per caption string (`cache_size` most recent), so a caption decoded
    with many latents is encoded once.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        num_tokens: int = CAPTION_TOKENS,
        prefix: str = CHI_PROMPT,
        cache_size: int = 64,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the token selection below assumes pads at the end
        self.num_tokens = num_tokens
        self.prefix = prefix
        self.prefix_tokens = len(tokenizer.encode(prefix))  # includes BOS
        self.max_length = self.prefix_tokens + num_tokens - 2
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_TEXT_ENCODER,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> CaptionEncoder:
        """Load Gemma-2 from a hub repo id or a local folder.

        bf16 on CUDA (the reference), fp32 on CPU by default. The reference environment ran
        Gemma-2 through PyTorch SDPA, which skips Gemma-2's attention-logit soft-capping; we
        reproduce those numerics by switching the soft-capping off in the config.
        revision: branch, tag or commit of the hub repo (default: main). Hub failures (gated,
        missing, offline) become one-line `pid.hub.HubAccessError`s.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from pid.hub import catchable_errors, download_command, translate_hub_error

        device = torch.device(device) if device is not None else torch.device("cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # No token argument: huggingface_hub sends get_token() (HF_TOKEN or `hf auth login`) itself.
        load = {"revision": revision} if revision else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **load)
            config = AutoConfig.from_pretrained(name_or_path, **load)
            text_config = getattr(config, "text_config", None) or config
            if hasattr(text_config, "attn_logit_softcapping"):
                text_config.attn_logit_softcapping = None
            with _no_loading_bar():
                model = AutoModel.from_pretrained(name_or_path, config=config, dtype=dtype, **load)
        except catchable_errors() as exc:
            local = Path(str(name_or_path)).expanduser()
            if local.exists():
                raise CheckpointNotFoundError(
                    f"caption encoder folder {local} is not a loadable Gemma-2 model "
                    f"({_first_line(exc)}); point text_encoder= at a folder made by save_pretrained"
                ) from None
            command = download_command(str(name_or_path), revision=revision)
            translated = translate_hub_error(
                exc, str(name_or_path), revision=revision, command=command, what=f"caption encoder {name_or_path}"
            )
            if translated is not None:
                raise translated from None
            if not isinstance(exc, OSError):
                raise
            raise CheckpointNotFoundError(
                f"caption encoder {name_or_path!r} is not available ({_first_line(exc)}); "
                f"download it with: {command}, or set text_encoder=<local folder>"
            ) from None
        if hasattr(model, "get_decoder") and not hasattr(model, "layers"):
            model = model.get_decoder()
        logger.info("caption encoder {} loaded ({}, {})", name_or_path, device, dtype)
        return cls(model.to(device), tokenizer, **kwargs)

    def _encode_uncached(self, captions: Sequence[str]) -> Tensor:
        texts = [self.prefix + caption for caption in captions]
        tokens = self.tokenizer(
            texts,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        hidden = self.model(**tokens).last_hidden_state  # [B, max_length, D]
        keep = torch.cat([hidden[:, :1], hidden[:, -(self.num_tokens - 1) :]], dim=1)
        return keep.float()

    @torch.no_grad()
    def encode(self, captions: str | Sequence[str]) -> Tensor:
        """Caption embeddings [B, 300, hidden] in fp32 on the encoder's device."""
        if isinstance(captions, str):
            captions = [captions]
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        fresh = dict(zip(missing, self._encode_uncached(missing), strict=True)) if missing else {}
        out = [fresh[c] if c in fresh else self._cache[c] for c in captions]
        for caption in dict.fromkeys(captions):  # remember the most recent captions
            self._cache[caption] = fresh.get(caption, self._cache.get(caption))
            self._cache.move_to_end(caption)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(out)

    @torch.no_grad()
    def precompute(self, captions: Sequence[str], batch_size: int = 8, cache_device: str = "cpu") -> None:
        """Encode `captions` in batches and keep them all cached on `cache_device`, so later `encode`
        calls need no model (which may then leave the GPU)."""
        unique = list(dict.fromkeys(captions))
        self.cache_size = max(self.cache_size, len(unique) + len(self._cache))
        for start in range(0, len(unique), batch_size):
            self.encode(unique[start : start + batch_size])
        for caption in unique:
            self._cache[caption] = self._cache[caption].to(cache_device)

    def forward(self, captions: str | Sequence[str]) -> Tensor:
        return self.encode(captions)

    def clear_cache(self) -> None:
        self._cache.clear()
