"""The web UI's "parameters" text: written into every saved PNG, read back by its PNG Info tab.

Layout: the prompt, a ``Negative prompt: ...`` line when there is one, then one line of
``Key: value`` pairs in the web UI's order; values holding ``,`` ``:`` or a newline are quoted
as JSON strings.
"""
from __future__ import annotations

import json
import re

# The web UI's key order (modules/processing.py, create_infotext); unknown keys follow in
# the order given.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
    "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Clip skip", "ENSD", "RNG", "Tiling", "Eta", "Eta DDIM",
)
LAST_KEYS = ("Version",)

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format(params: dict) -> str:  # noqa: A001 - the public name (docs/webui.md)
    """Infotext for ``params``: "Prompt", "Negative prompt" and the web UI's keys (a size may
    be given as "Size" or as "Size-1"/"Size-2", as ``parse`` returns it). Keys whose value is
    None are left out, and so is "Clip skip" when it is 1."""
    p = dict(params)
    prompt = str(p.pop("Prompt", "") or "")
    negative = str(p.pop("Negative prompt", "") or "")
    for key in [k for k in p if k.endswith("-1")]:
        base = key[:-2]
        if base + "-2" in p:
            p[base] = f"{p.pop(key)}x{p.pop(base + '-2')}"
    if str(p.get("Clip skip", "")) in ("1", "None"):
        p.pop("Clip skip")
    ordered = [k for k in KEY_ORDER if k in p] + [k for k in p if k not in KEY_ORDER and k not in LAST_KEYS]
    ordered += [k for k in LAST_KEYS if k in p]
    pairs = ", ".join(f"{k}: {quote(p[k])}" for k in ordered if p[k] is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{pairs}".strip()


def parse(text: str) -> dict:
    """The web UI's ``parse_generation_parameters``: "Prompt", "Negative prompt", then each
    key as written (values are strings; "Size: 512x768" gives "Size-1" and "Size-2");
    "Clip skip" defaults to "1" as in the web UI."""
    res: dict[str, str] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, last = str(text).strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    for k, v in _RE_PARAM.findall(last):
        v = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
        m = _RE_SIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    res.setdefault("Clip skip", "1")
    return res
