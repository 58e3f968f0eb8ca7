"""Tiny random-weight diffusers pipelines for every diffusers backbone, built fully offline.

Recipes follow spec/environment.md §4: tokenizers are built in memory (no hub, no files), the model configs
are the smallest that still line up (text hidden sizes = transformer joint dims, vocab = tokenizer length),
and the known quirks are handled (Z-Image pad tokens, Flux2 `text_encoder_out_layers`, Qwen3 `head_dim`, the
Mistral stand-in for FLUX.2-dev's PixtralProcessor, Qwen2.5-VL token ids).

    pipe = make_tiny_pipeline("flux")
    out = pipe(**tiny_call_kwargs("flux", prompt="a cat"), output_type="latent")
    # or, through the registry: call_kwargs(spec, ..., overrides=tiny_call_overrides("flux"))

Pipelines are cached per family (klein-4b/9b, zimage/zimage-turbo and the two qwenimage names share one), so a
test session builds each once. A cached pipeline is shared: tests that change it (dtype, offload, scheduler
config) must ask for `fresh=True`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# backbone name -> builder family (names that share an architecture share a tiny pipeline)
_FAMILY = {
    "flux": "flux",
    "flux2": "flux2",
    "flux2-klein-4b": "flux2-klein",
    "flux2-klein-9b": "flux2-klein",
    "sd3": "sd3",
    "sdxl": "sdxl",
    "zimage": "zimage",
    "zimage-turbo": "zimage",
    "qwenimage": "qwenimage",
    "qwenimage-2512": "qwenimage",
}

TINY_BACKBONES: tuple[str, ...] = tuple(_FAMILY)
TINY_SIZE = 64
TINY_STEPS = 3

# Per-family call kwargs that make the tiny pipelines run (they override the registry's real-model defaults).
_TINY_CALL_OVERRIDES: dict[str, dict[str, Any]] = {
    "flux": {"max_sequence_length": 32, "guidance_scale": 3.5},
    "flux2": {"max_sequence_length": 32, "text_encoder_out_layers": (1,)},
    "flux2-klein": {"max_sequence_length": 32, "text_encoder_out_layers": (1,)},
    "sd3": {"max_sequence_length": 32, "guidance_scale": 5.0},
    "sdxl": {"guidance_scale": 5.0},
    "zimage": {
        "max_sequence_length": 32,
        "guidance_scale": 3.0,
        "cfg_normalization": False,
        "cfg_truncation": 1.0,
        "negative_prompt": "bad",
    },
    "qwenimage": {"max_sequence_length": 32, "true_cfg_scale": 1.0, "negative_prompt": None},
}


def family_of(backbone: str) -> str:
    try:
        return _FAMILY[backbone]
    except KeyError:
        raise KeyError(f"no tiny pipeline for {backbone!r}; known: {', '.join(TINY_BACKBONES)}") from None


def tiny_call_overrides(backbone: str) -> dict[str, Any]:
    """Call kwargs (beyond size and steps) the tiny pipeline needs, as `overrides` for `pipelines.call_kwargs`."""
    return dict(_TINY_CALL_OVERRIDES[family_of(backbone)])


def tiny_call_kwargs(backbone: str, **extra: Any) -> dict[str, Any]:
    """Call overrides that make `make_tiny_pipeline(backbone)` run at 64x64 in 3 steps (merge over the
    registry's)."""
    kwargs: dict[str, Any] = {"height": TINY_SIZE, "width": TINY_SIZE, "num_inference_steps": TINY_STEPS}
    kwargs.update(_TINY_CALL_OVERRIDES[family_of(backbone)])
    kwargs.update(extra)
    return kwargs


def make_tiny_pipeline(backbone: str, *, fresh: bool = False) -> Any:
    """A tiny random-weight pipeline of the backbone's diffusers class (cached per family unless `fresh`)."""
    family = family_of(backbone)
    if fresh:
        return _build(family)
    return _cached_pipeline(family)


@functools.cache
def _cached_pipeline(family: str) -> Any:
    return _build(family)


def _build(family: str) -> Any:
    pipe = _BUILDERS[family]()
    # Freshly constructed modules are in training mode (T5 dropout would make runs differ); from_pretrained
    # returns eval-mode modules, so match it.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


# ------------------------------------------------------------------------------------------------------------
# Tokenizers (environment.md §4.1)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-character table (the base alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes, strict=True))]


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@contextlib.contextmanager
def _bpe_files(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """vocab.json + merges.txt in a temporary folder that is removed afterwards: a BPE tokenizer source
    transformers 4 and 5 both accept (5 also takes in-memory dicts; 4 only file paths). The tokenizer reads
    them when built, so build it inside the block."""
    with tempfile.TemporaryDirectory(prefix="pid-tiny-tokenizer-") as name:
        folder = Path(name)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        yield str(folder / "vocab.json"), str(folder / "merges.txt")


@functools.cache
def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>")]  # tuples: "a b" strings raise in tokenizers 0.23
    vocab_list += ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    with _bpe_files(vocab, merges) as files:
        tok = CLIPTokenizer(*files)
    tok.model_max_length = 77
    return tok


@functools.cache
def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,"
    pieces += [(c, -3.0) for c in letters]
    pieces += [("▁" + c, -3.5) for c in letters]
    pieces += [("▁" + w, -1.0) for w in ("a", "the", "cat", "photo", "of", "dog", "red", "bad")]
    if _transformers_major() >= 5:
        return T5Tokenizer(vocab=pieces, extra_ids=0)
    # transformers 4's T5Tokenizer needs a sentencepiece file; its fast class takes the same Unigram model.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


_QWEN_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
]

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


@functools.cache
def qwen_tokenizer() -> Any:
    """Qwen2/Qwen3-style byte-level BPE with the chat specials (used by Klein, Z-Image and QwenImage)."""
    from transformers import Qwen2Tokenizer

    chars = _bytes_to_unicode()
    merges = [("t", "h"), ("th", "e")]
    vocab_list = chars + ["th", "the", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    with _bpe_files(vocab, merges) as files:
        tok = Qwen2Tokenizer(
            *files,
            unk_token=None,
            bos_token=None,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )
    tok.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


_MISTRAL_CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}</s>{% endif %}"
    "{% endfor %}"
)


@functools.cache
def mistral_standin_tokenizer() -> Any:
    """Stands in for FLUX.2-dev's PixtralProcessor (which needs torchvision): only apply_chat_template is
    used."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<unk>",
        "[IMG]",
        "<s>",
        "</s>",
        "<pad>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
    ]
    vocab_list = specials + _bytes_to_unicode()
    vocab = {token: index for index, token in enumerate(vocab_list)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[5:] + ["[IMG]"],
    )
    tok.chat_template = _MISTRAL_CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


# ------------------------------------------------------------------------------------------------------------
# Text encoders (environment.md §4.2)


def _clip_config(tok: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        vocab_size=len(tok),
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),  # picks the pooled token
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


def _t5_encoder(tok: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        is_encoder_decoder=False,
        use_cache=False,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5EncoderModel(config)


def _qwen3_config(tok: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,  # the default is 128
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _flow_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


def _flux_vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


# ------------------------------------------------------------------------------------------------------------
# Pipeline builders


def _build_flux() -> Any:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 4 x latent_channels: Flux packs 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=_flow_scheduler(),
        vae=_flux_vae(latent_channels=1),
        text_encoder=CLIPTextModel(_clip_config(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    ).to("cpu")


def _build_sd3() -> Any:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        scheduler=_flow_scheduler(),
        vae=_flux_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_tok)),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5_encoder(t5_tok),
        tokenizer_3=t5_tok,
        transformer=transformer,
    ).to("cpu")


def _build_sdxl() -> Any:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    clip_tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 x 8 + 32
        cross_attention_dim=64,  # 32 + 32
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_clip_config(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_tok)),
        tokenizer_2=clip_tok,
        unet=unet,
        scheduler=scheduler,
    ).to("cpu")


def _flux2_transformer(guidance_embeds: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,  # text hidden x len(text_encoder_out_layers)
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    )


def _flux2_vae() -> Any:
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        sample_size=32,
        block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_flux2_klein() -> Any:
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    return Flux2KleinPipeline(
        scheduler=_flow_scheduler(),
        vae=_flux2_vae(),
        text_encoder=Qwen3ForCausalLM(_qwen3_config(tok)),
        tokenizer=tok,
        transformer=_flux2_transformer(guidance_embeds=False),
    ).to("cpu")


def _build_flux2() -> Any:
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tok = mistral_standin_tokenizer()
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tok),
            "hidden_size": 16,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 1,
            "num_key_value_heads": 2,
            "rope_theta": 1e9,
            "sliding_window": None,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 4,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
        },
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=1,
    )
    return Flux2Pipeline(
        scheduler=_flow_scheduler(),
        vae=_flux2_vae(),
        text_encoder=Mistral3ForConditionalGeneration(config),
        tokenizer=tok,
        transformer=_flux2_transformer(guidance_embeds=True),
    ).to("cpu")


def _build_zimage() -> Any:
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    # The pad tokens are torch.empty: uninitialised memory gives random NaNs.
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    return ZImagePipeline(
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=Qwen3Model(_qwen3_config(tok)),
        tokenizer=tok,
        transformer=transformer,
    ).to("cpu")


def _build_qwenimage() -> Any:
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tok = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tok),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1e6,
            "bos_token_id": None,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=len(tok),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|vision_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
    )
    return QwenImagePipeline(
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tok,
        transformer=transformer,
    ).to("cpu")


_BUILDERS = {
    "flux": _build_flux,
    "flux2": _build_flux2,
    "flux2-klein": _build_flux2_klein,
    "sd3": _build_sd3,
    "sdxl": _build_sdxl,
    "zimage": _build_zimage,
    "qwenimage": _build_qwenimage,
}
