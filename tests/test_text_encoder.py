"""Caption encoding: prefix, right padding, BOS + last 299 positions, caching."""

import torch

from pid.text_encoder import CHI_PROMPT, NEGATIVE_PROMPT

from tiny import tiny_caption_encoder, tiny_tokenizer


def test_prefix_text_matches_reference_lines():
    lines = CHI_PROMPT.split("\n")
    assert len(lines) == 8 and lines[-1] == "User Prompt: " and lines[0].startswith("Given a user prompt")
    assert NEGATIVE_PROMPT.startswith("low quality, worst quality") and NEGATIVE_PROMPT.endswith("watermark")


def test_token_selection_is_bos_plus_last_299():
    enc = tiny_caption_encoder()
    tok = tiny_tokenizer()
    assert enc.prefix_tokens == len(tok.encode(CHI_PROMPT))
    assert enc.max_length == enc.prefix_tokens + 298
    out = enc.encode(["a photo of a cat"])
    assert out.shape == (1, 300, 32) and out.dtype == torch.float32

    ids = tok(
        [CHI_PROMPT + "a photo of a cat"],
        max_length=enc.max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    assert ids["input_ids"][0, 0] == tok.bos_token_id
    assert ids["attention_mask"][0, -1] == 0  # right padding
    hidden = enc.model(**ids).last_hidden_state
    expected = torch.cat([hidden[:, :1], hidden[:, -299:]], 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_captions_differ_and_cache_is_reused():
    enc = tiny_caption_encoder()
    a, b = enc.encode(["a red fox", "a dog"])
    assert (a - b).abs().max() > 1e-4
    calls = []
    original = enc._encode_uncached
    enc._encode_uncached = lambda caps: calls.append(list(caps)) or original(caps)
    again = enc.encode(["a dog", "a red fox", "a dog"])
    assert calls == []
    assert torch.equal(again[1], a) and torch.equal(again[0], b)
    enc.encode([""])  # an empty caption is legal
    assert calls == [[""]]


def test_cache_is_bounded():
    enc = tiny_caption_encoder(cache_size=2)
    enc.encode(["a", "b", "c"])
    assert len(enc._cache) == 2


def test_padding_is_forced_to_the_right():
    from pid.text_encoder import CaptionEncoder

    from tiny import tiny_gemma

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    enc = CaptionEncoder(tiny_gemma(), tok)
    assert enc.tokenizer.padding_side == "right"
    right = tiny_caption_encoder().encode(["a cat"])
    assert torch.allclose(enc.encode(["a cat"]), right, atol=1e-6)
