"""Infotext: the web UI's layout, parsed back, and carried in saved PNGs."""
import pytest
from PIL import Image

from sdrt import infotext

# written by the web UI itself (1.10), PNG Info tab
WEBUI = """masterpiece, best quality, (a girl:1.2) standing in a field of flowers, [sunny:cloudy:0.5] sky
Negative prompt: lowres, bad anatomy, (worst quality:1.4)
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3846374, Size: 512x768, Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.5, Clip skip: 2, ENSD: 31337, Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1"""  # noqa: E501


def test_parse_web_ui_text():
    p = infotext.parse(WEBUI)
    assert p["Prompt"].startswith("masterpiece") and p["Prompt"].endswith("[sunny:cloudy:0.5] sky")
    assert p["Negative prompt"] == "lowres, bad anatomy, (worst quality:1.4)"
    assert p["Steps"] == "28" and p["Sampler"] == "DPM++ 2M" and p["Schedule type"] == "Karras"
    assert p["CFG scale"] == "7" and p["Seed"] == "3846374"
    assert (p["Size-1"], p["Size-2"]) == ("512", "768")
    assert p["Clip skip"] == "2" and p["ENSD"] == "31337"
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"     # quoted value, unquoted
    assert p["Version"] == "v1.10.1"


def test_round_trip_web_ui_text():
    assert infotext.format(infotext.parse(WEBUI)) == WEBUI


@pytest.mark.parametrize("text", [
    "a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, Size: 512x512, "
    "Model hash: abcdef1234, Model: sd15, Version: sdrt 0.1.0",
    "multi\nline prompt\nNegative prompt: a\nb\nSteps: 5, Sampler: Euler, Schedule type: Karras, CFG scale: 3.5, "
    "Seed: 9, Size: 64x64, Clip skip: 2, RNG: NV",
    "quoted\nSteps: 5, Sampler: Euler, Schedule type: Uniform, CFG scale: 1, Seed: 0, Size: 8x8, "
    "Model: \"random:tiny\", Note: \"a, b\\nc\"",
])
def test_round_trip(text):
    assert infotext.format(infotext.parse(text)) == text


def test_format_orders_keys_and_quotes():
    text = infotext.format({"Version": "v", "Seed": 3, "Steps": 2, "Prompt": "p", "Negative prompt": "",
                            "Model": "a:b", "Custom": "x,y", "Clip skip": 1, "Sampler": "Euler", "ENSD": None})
    assert text == 'p\nSteps: 2, Sampler: Euler, Seed: 3, Model: "a:b", Custom: "x,y", Version: v'


def test_prompt_only_text():
    p = infotext.parse("just a prompt")
    assert p["Prompt"] == "just a prompt" and p["Negative prompt"] == "" and p["Clip skip"] == "1"


def test_long_prompt_with_everything_round_trips_through_png(tiny, tmp_path):
    """A 200-token prompt with weights, BREAK, editing and CLIP skip 2 generates, and the PNG's
    infotext parses back to the same settings."""
    words = ", ".join(f"(detail{i}:1.{i % 9 + 1})" if i % 7 == 0 else f"word{i}" for i in range(60))
    prompt = f"a [castle:fortress:0.4] on a hill, {words} BREAK dramatic [sky|clouds], highly detailed"
    from sdrt.conditioning import tokenize_weighted
    from sdrt.tokenizer import clip_tokenizer
    n_tokens = sum(sum(1 for i in ids if i not in (49406, 49407)) for ids, _ in tokenize_weighted(clip_tokenizer(), prompt))
    assert n_tokens >= 200
    r = tiny(prompt, negative_prompt="blurry, (low quality:1.3)", steps=6, sampler="DPM++ 2M", schedule="Karras",
             cfg_scale=6.0, seed=777, width=64, height=72, clip_skip=2, rng="cpu", eta_noise_seed_delta=31337,
             subseed=5, subseed_strength=0.25)
    path = r.save(tmp_path / "long.png")
    p = infotext.parse(Image.open(path).text["parameters"])
    assert p["Prompt"] == prompt and p["Negative prompt"] == "blurry, (low quality:1.3)"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"]) == \
        ("6", "DPM++ 2M", "Karras", "6.0", "777")
    assert (p["Size-1"], p["Size-2"], p["Clip skip"], p["RNG"]) == ("64", "72", "2", "CPU")
    assert (p["Variation seed"], p["Variation seed strength"]) == ("5", "0.25")
    assert "ENSD" not in p      # DPM++ 2M draws no sampler noise, as the web UI records it
    # the same settings from the parsed text give the same image
    again = tiny(p["Prompt"], negative_prompt=p["Negative prompt"], steps=int(p["Steps"]), sampler=p["Sampler"],
                 schedule=p["Schedule type"], cfg_scale=float(p["CFG scale"]), seed=int(p["Seed"]),
                 width=int(p["Size-1"]), height=int(p["Size-2"]), clip_skip=int(p["Clip skip"]), rng="cpu",
                 subseed=int(p["Variation seed"]), subseed_strength=float(p["Variation seed strength"]))
    assert (again.pixels == r.pixels).all()
