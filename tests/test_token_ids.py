"""Token ids come from the model's own tokenizer: start, end, pad and comma ids, the web UI's
windows for SD 1.x (pad = end) and SD 2.x (OpenCLIP pads with id 0 after the first end token),
on a model whose tokenizer has a small non-CLIP vocabulary (which used to fail inside the text
encoder with ``IndexError: index out of range in self``), against diffusers' pipeline."""
from __future__ import annotations

import dataclasses
import string

import numpy as np
import pytest
import torch

import sdrt
from sdrt.backends import create_backend
from sdrt.conditioning import tokenize_weighted
from sdrt.models import RANDOM_MODELS, build_random
from sdrt.tokenizer import CHUNK, TokenIds, clip_tokenizer, token_ids

STEPS, SIZE, SEED = 8, 64, 5


def small_tokenizer(pad: str):
    """A CLIP BPE tokenizer over 57 tokens (no merges: one token per letter), with the special
    tokens first, so every id differs from the stock vocabulary's 49406/49407."""
    from transformers import CLIPTokenizer
    letters = list(string.ascii_lowercase) + [","]
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for suffix in ("", "</w>"):
        vocab.update({ch + suffix: len(vocab) + i for i, ch in enumerate(letters)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def small_vocab_model(pad: str):
    """random:tiny with the small tokenizer and a text encoder of that vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel
    tok = small_tokenizer(pad)
    cfg = dict(RANDOM_MODELS["tiny"]["text"], vocab_size=len(tok.get_vocab()))
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **cfg)).eval().requires_grad_(False)
    for m in text.modules():          # a random affine part, as build_random gives its norms
        if isinstance(m, torch.nn.LayerNorm):
            with torch.no_grad():
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
    c = build_random("tiny")
    return dataclasses.replace(c, name=f"small-vocab-{pad}", tokenizer=tok, text_encoder=text)


def test_ids_of_the_stock_and_a_small_tokenizer():
    assert token_ids(clip_tokenizer()) == TokenIds(bos=49406, eos=49407, pad=49407, comma=267)
    sd2 = token_ids(small_tokenizer("!"))
    assert sd2 == TokenIds(bos=1, eos=2, pad=0, comma=56) and sd2.pads_after_end
    assert sd2.window([30, 5]) == [1, 30, 5, 2] + [0] * 73
    assert sd2.window([7] * CHUNK) == [1] + [7] * CHUNK + [2]           # a full window ends with its end token
    sd1 = token_ids(small_tokenizer("<|endoftext|>"))
    assert sd1.window([30]) == [1, 30] + [2] * 75 and not sd1.pads_after_end


def test_windows_follow_the_tokenizer():
    tok = small_tokenizer("!")
    windows = tokenize_weighted(tok, "a cat, (dog:1.5) BREAK b")
    assert len(windows) == 2 and all(len(ids) == 77 for ids, _ in windows)
    ids, weights = windows[0]
    assert ids[0] == 1 and ids[ids.index(2) + 1:] == [0] * (76 - ids.index(2)) and max(weights) == 1.5
    assert max(max(ids) for ids, _ in windows) < len(tok.get_vocab())


def test_a_tokenizer_without_end_token_is_refused():
    class NoSpecials:
        bos_token_id = eos_token_id = pad_token_id = None
        bos_token = eos_token = None
    with pytest.raises(ValueError, match="no start or end token"):
        token_ids(NoSpecials())


def _diffusers_images(c, prompt, negative):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    ref = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                  scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                                   beta_schedule="scaled_linear",
                                                                   use_karras_sigmas=True, timestep_spacing="linspace"),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    f = c.latent_factor
    noise = torch.randn((1, 4, SIZE // f, SIZE // f), generator=torch.Generator().manual_seed(SEED))
    return ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE,
               width=SIZE, latents=noise, output_type="np").images


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1-pads-with-end", "sd2-pads-with-0"])
def test_a_small_vocabulary_model_equals_diffusers(pad):
    c = small_vocab_model(pad)
    pipe = sdrt.Pipeline(c, create_backend("torch", c, "cpu", "float32"))
    prompt, negative = "a red cube, on a table", "blurry"
    got = pipe(prompt, negative_prompt=negative, steps=STEPS, cfg_scale=6.0, sampler="Euler", schedule="Karras",
               seed=SEED, width=SIZE, height=SIZE, rng="cpu")
    want = _diffusers_images(c, prompt, negative)
    assert want.std() > 0.01 and np.abs(got.pixels - want).max() <= 1e-4


@pytest.mark.slow
def test_the_compiled_text_encoder_takes_the_model_s_ids(tmp_path):
    """ONNX Runtime, with a text encoder exported for a 57-token vocabulary, equals torch."""
    c = small_vocab_model("!")
    args = dict(prompt="a dog", negative_prompt="", steps=3, sampler="Euler", seed=2, width=SIZE, height=SIZE)
    want = sdrt.Pipeline(c, create_backend("torch", c, "cpu", "float32"))(**args)
    ort = sdrt.Pipeline(c, create_backend("onnxruntime", c, "cpu", "float32", engine_dir=str(tmp_path)))
    assert np.abs(ort(**args).pixels - want.pixels).max() <= 1e-3
