"""Weighted 75-token windows, BREAK, comma backtracking, emphasis, CLIP skip, scheduled
conditioning inside the loop and AND."""
import numpy as np
import pytest
import torch

from sdrt.conditioning import apply_emphasis, encode_texts, tokenize_weighted
from sdrt.tokenizer import BOS_ID, EOS_ID, clip_tokenizer

TOK = clip_tokenizer()
COMMA = 267


def ids_of(text):
    return TOK(text, add_special_tokens=False).input_ids


def test_short_prompt_is_one_window_padded_with_eos():
    [(ids, w)] = tokenize_weighted(TOK, "a (cat:1.5)")
    assert len(ids) == 77 and ids[:4] == [BOS_ID, 320, 2368, EOS_ID] and set(ids[3:]) == {EOS_ID}
    assert w[:4] == [1.0, 1.0, 1.5, 1.0] and set(w[3:]) == {1.0}


def test_empty_prompt_and_break():
    assert tokenize_weighted(TOK, "")[0][0] == [BOS_ID] + [EOS_ID] * 76
    windows = tokenize_weighted(TOK, "a cat BREAK a dog")
    assert len(windows) == 2
    assert windows[0][0][:4] == [BOS_ID, 320, 2368, EOS_ID] and windows[1][0][:4] == [BOS_ID, 320, 1929, EOS_ID]


def test_long_prompt_fills_windows_of_75():
    text = " ".join(["cat"] * 160)
    windows = tokenize_weighted(TOK, text)
    assert len(windows) == 3
    assert windows[0][0][1:76] == [2368] * 75 and windows[1][0][1:76] == [2368] * 75
    assert windows[2][0][1:11] == [2368] * 10 and windows[2][0][11] == EOS_ID


def test_comma_backtrack_moves_text_after_the_last_comma():
    # 70 words, a comma, then 10 words: the window fills inside the last 10 words, so the
    # text after the comma (within 20 tokens) moves to the next window.
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    w1, w2 = tokenize_weighted(TOK, text)
    assert w1[0][1:72] == [2368] * 70 + [COMMA] and set(w1[0][72:]) == {EOS_ID}
    assert w2[0][1:11] == [1929] * 10
    # with the comma farther back than 20 tokens, nothing moves
    text = " ".join(["cat"] * 40) + ", " + " ".join(["dog"] * 40)
    w1, w2 = tokenize_weighted(TOK, text)
    assert w1[0][42:76] == [1929] * 34 and w2[0][1:7] == [1929] * 6


def test_emphasis_original_keeps_the_mean_and_no_norm_only_multiplies():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 154, 8, generator=g) + 0.3
    w = torch.ones(2, 154)
    w[0, 5:9] = 1.5
    w[1, 80] = 0.5
    out = apply_emphasis(h, w, "Original")
    for t in range(2):
        for k in range(2):
            win = slice(77 * k, 77 * (k + 1))
            assert out[t, win].mean().item() == pytest.approx(h[t, win].mean().item(), rel=1e-5, abs=1e-6)
    ratio = out[0, 5] / h[0, 5]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))     # a weight scales the whole token
    torch.testing.assert_close(apply_emphasis(h, w, "No norm"), h * w[..., None])
    assert apply_emphasis(h, torch.ones(2, 154)) is h


def test_encode_pads_all_texts_to_the_same_window_count(tiny):
    long = " ".join(["cat"] * 100)
    emb = encode_texts(tiny.backend, TOK, ["a cat", long, ""], 1)
    assert {tuple(v.shape) for v in emb.values()} == {(154, 32)}
    short_alone = encode_texts(tiny.backend, TOK, ["a cat"], 1)["a cat"]
    torch.testing.assert_close(emb["a cat"][:77], short_alone)


def test_clip_skip_takes_an_earlier_layer_then_the_final_norm(tiny):
    te = tiny.backend.text_encoder
    ids = torch.tensor([[BOS_ID, 320, 2368] + [EOS_ID] * 74])
    out = tiny.backend.encode_text(ids, 2)
    hs = te(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, tiny.backend.final_layer_norm(hs[-2]))
    assert not torch.allclose(out, tiny.backend.encode_text(ids, 1))
    with pytest.raises(ValueError, match="clip_skip"):
        tiny.backend.encode_text(ids, 99)


class ContextSpy:
    """Records which conditioning each UNet call receives."""

    def __init__(self, backend):
        self.backend, self.orig, self.contexts = backend, backend.unet, []

    def __enter__(self):
        def spy(x, t, ctx):
            self.contexts.append(ctx.clone())
            return self.orig(x, t, ctx)
        self.backend.unet = spy
        return self

    def __exit__(self, *exc):
        self.backend.unet = self.orig


ARGS = dict(width=64, height=64, seed=5, cfg_scale=7.0)


def test_prompt_editing_switches_conditioning_at_the_scheduled_call(tiny):
    emb = encode_texts(tiny.backend, TOK, ["a cat", "a dog", ""], 1)
    with ContextSpy(tiny.backend) as spy:
        tiny("a [cat:dog:3]", steps=8, sampler="Euler", **ARGS)
    assert len(spy.contexts) == 8
    # the web UI's counting: calls 0..3 satisfy call <= 3, so "a cat" holds for four calls
    for i, ctx in enumerate(spy.contexts):
        expected = emb["a cat"] if i <= 3 else emb["a dog"]
        torch.testing.assert_close(ctx[0], expected)
        torch.testing.assert_close(ctx[1], emb[""])


def test_second_order_samplers_count_two_calls_per_step(tiny):
    emb = encode_texts(tiny.backend, TOK, ["a cat", "a dog"], 1)
    with ContextSpy(tiny.backend) as spy:
        tiny("a [cat:dog:0.5]", steps=5, sampler="Heun", **ARGS)
    # Heun: 2 calls per step but 1 on the last: 9 calls; the schedule runs over 10 (0.5 -> 5)
    assert len(spy.contexts) == 9
    switched = [i for i, c in enumerate(spy.contexts) if torch.allclose(c[0], emb["a dog"])]
    assert switched == list(range(6, 9))


def test_alternation_and_negative_schedule(tiny):
    emb = encode_texts(tiny.backend, TOK, ["a cat", "a dog", "blurry", "dark"], 1)
    with ContextSpy(tiny.backend) as spy:
        tiny("a [cat|dog]", negative_prompt="[blurry:dark:2]", steps=4, sampler="DPM++ 2M", **ARGS)
    conds = ["a cat" if torch.allclose(c[0], emb["a cat"]) else "a dog" for c in spy.contexts]
    # alternation: option (step-1) % 2 at steps 1..4, looked up at calls 0..3 with call <= step
    assert conds == ["a cat", "a cat", "a dog", "a cat"]
    negs = ["blurry" if torch.allclose(c[1], emb["blurry"]) else "dark" for c in spy.contexts]
    assert negs == ["blurry", "blurry", "blurry", "dark"]


def test_and_composes_weighted_predictions(tiny):
    with ContextSpy(tiny.backend) as spy:
        r = tiny("a cat AND a dog :0.5", steps=3, sampler="Euler", **ARGS)
    assert [c.shape[0] for c in spy.contexts] == [3, 3, 3]       # two cond parts + uncond
    alone = tiny("a cat", steps=3, sampler="Euler", **ARGS)
    assert np.abs(r.pixels - alone.pixels).max() > 1e-4


def test_and_with_weight_zero_equals_the_plain_prompt(tiny):
    a = tiny("a cat AND a dog :0", steps=3, sampler="Euler", **ARGS)
    b = tiny("a cat", steps=3, sampler="Euler", **ARGS)
    np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-5)


def test_weights_change_the_image_and_emphasis_option(tiny):
    base = tiny("a cat on a sofa", steps=3, sampler="Euler", **ARGS).pixels
    weighted = tiny("a (cat:1.6) on a sofa", steps=3, sampler="Euler", **ARGS).pixels
    assert np.abs(base - weighted).max() > 1e-4
    ignored = tiny("a (cat:1.6) on a sofa", steps=3, sampler="Euler", emphasis="Ignore", **ARGS)
    np.testing.assert_allclose(ignored.pixels, tiny("a (cat) on a sofa", steps=3, sampler="Euler",
                                                     emphasis="Ignore", **ARGS).pixels, atol=1e-6)
    assert "Emphasis: Ignore" in ignored.infotexts[0]
    with pytest.raises(ValueError, match="emphasis"):
        tiny("x", emphasis="Loud", **ARGS)


def test_tokenizing_is_cached_but_results_are_fresh_lists():
    """Texts are tokenized several times on their way (bounds, window count, encoder): one
    computation, and a caller that changes its lists cannot change the next caller's."""
    from sdrt.conditioning import _tokenize_cached
    before = _tokenize_cached.cache_info().hits
    first = tokenize_weighted(TOK, "a (cached:1.2) prompt")
    first[0][0][1] = -1
    second = tokenize_weighted(TOK, "a (cached:1.2) prompt")
    assert _tokenize_cached.cache_info().hits == before + 1 and second[0][0][1] != -1
