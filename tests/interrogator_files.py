"""Inputs for the interrogator's tests: a small term-list folder and random images."""
from __future__ import annotations

import numpy as np
from PIL import Image

WORDS = ("red blue green golden silver dark bright misty sunny stormy ancient modern tiny huge quiet loud soft sharp "
         "warm cold painted drawn carved woven glowing shadowed").split()


def write_lists(folder, flavors: int = 120):
    """A small term-list folder in the web UI's layout (artists, flavors, mediums, movements,
    negative): real words, so the CLIP tokenizer sees ordinary text."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (folder / "artists.txt").write_text("\n".join(f"{a} {b}".title() for a, b in zip(WORDS, WORDS[3:] + WORDS[:3])))
    (folder / "flavors.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 3)) + f" {i}" for i in range(flavors)))
    (folder / "mediums.txt").write_text("an oil painting\na photograph\na watercolor\na pencil sketch\na 3D render\n")
    (folder / "movements.txt").write_text("impressionism\ncubism\nsurrealism\nart nouveau\npop art\nbaroque\n")
    (folder / "negative.txt").write_text("blurry\nugly\nlow quality\njpeg artifacts\nwatermark\n")
    return folder


def image(seed=0, w=80, h=96):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))
