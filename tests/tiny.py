"""Builders of tiny random-weight PiD components for tests (no files, no network)."""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache

import torch

from pid.checkpoints import lookup
from pid.decoder import PiDDecoder
from pid.models import PiDNet, PiDNetConfig, build_pid_net, get_net_config
from pid.text_encoder import CHI_PROMPT, NEGATIVE_PROMPT, CaptionEncoder

TINY_TEXT_DIM = 32

EXTRA_WORDS = "a photo of cat dog red fox in snow the city at night hello world".split()


def tiny_config(base: str = "v1_latent16ch", **overrides) -> PiDNetConfig:
    """A released config shrunk to test size (same layout, same adapter kind)."""
    small = dict(
        hidden_size=64,
        num_heads=4,
        patch_depth=4,
        pixel_hidden_size=8,
        pixel_attn_hidden_size=32,
        pixel_num_heads=2,
        text_dim=TINY_TEXT_DIM,
        adapter_width=32,
    )
    small.update(overrides)
    return replace(get_net_config(base), **small)


def tiny_net(base: str = "v1_latent16ch", seed: int = 0, **overrides) -> PiDNet:
    torch.manual_seed(seed)
    return build_pid_net(tiny_config(base, **overrides))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A word-level tokenizer that, like Gemma's, prepends <bos> and pads with <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = sorted(set(_words(CHI_PROMPT + " " + NEGATIVE_PROMPT)) | set(EXTRA_WORDS))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_gemma(seed: int = 0):
    from transformers import Gemma2Config, Gemma2Model

    tok = tiny_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_logit_softcapping=None,  # as CaptionEncoder.from_pretrained sets it
    )
    torch.manual_seed(seed)
    return Gemma2Model(config).eval()


def tiny_caption_encoder(seed: int = 0, **kwargs) -> CaptionEncoder:
    return CaptionEncoder(tiny_gemma(seed), tiny_tokenizer(), **kwargs)


def tiny_decoder(
    backbone: str = "flux", ckpt_type: str = "2k", seed: int = 0, text_encoder: bool = True
) -> PiDDecoder:
    """A PiDDecoder with a tiny network of the record's config kind and a tiny Gemma-2."""
    record = lookup(backbone, ckpt_type)
    net = tiny_net(record.net_config, seed=seed)
    return PiDDecoder(net, record, tiny_caption_encoder(seed) if text_encoder else None)
