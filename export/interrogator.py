"""The interrogator's networks as export specs, graph modules and an engine folder: CLIP's image
and text towers (projected features), BLIP's vision encoder, the cross-attention keys and
values of its decoder (once per image) and one decoder step over a key/value cache. Built like
the diffusion networks (``build.py``: keyed artifacts, manifest, staging, lock), and declared
for TensorRT by their profiles (``tensorrt_shapes``).

Symbolic dimensions: ``B`` images, ``S`` image size, ``D`` CLIP's feature width, ``N`` texts,
``T`` tokens (CLIP: up to 77, the longest text of a batch: see ``ClipTextGraph``; BLIP: new
tokens), ``P``/``C`` BLIP's image tokens and width, ``K`` beams, ``L`` decoder layers, ``H``
heads, ``E`` head width, ``R`` cached tokens (``RT``: R + T), ``V`` vocabulary.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .build import (
    FORMAT,
    artifact_key,
    check_artifact,
    key_digest,
    open_folder,
    ort_offline_optimize,
    staged_onnx,
    write_manifest,
)
from .onnx_export import OPSET, trace_to_onnx
from .specs import NetworkSpec, TensorSpec

CLIP_IMAGE = NetworkSpec("clip_image", inputs=(TensorSpec("pixel_values", ("B", 3, "S", "S")),),
                         outputs=(TensorSpec("image_embeds", ("B", "D")),))
CLIP_TEXT = NetworkSpec("clip_text", inputs=(TensorSpec("input_ids", ("N", "T"), "int64"),),
                        outputs=(TensorSpec("text_embeds", ("N", "D")),))
BLIP_VISION = NetworkSpec("blip_vision", inputs=(TensorSpec("pixel_values", ("B", 3, "S", "S")),),
                          outputs=(TensorSpec("image_embeds", ("B", "P", "C")),))
BLIP_CROSS = NetworkSpec("blip_cross", inputs=(TensorSpec("image_embeds", (1, "P", "C")),),
                         outputs=(TensorSpec("cross", ("L", 2, 1, "H", "P", "E")),))
BLIP_STEP = NetworkSpec("blip_step",
                        inputs=(TensorSpec("input_ids", ("K", "T"), "int64"),
                                TensorSpec("past", ("L", 2, "K", "H", "R", "E")),
                                TensorSpec("cross", ("L", 2, 1, "H", "P", "E"))),
                        outputs=(TensorSpec("logits", ("K", "V")), TensorSpec("present", ("L", 2, "K", "H", "RT", "E"))))
INTERROGATOR_NETWORKS = {s.name: s for s in (CLIP_IMAGE, CLIP_TEXT, BLIP_VISION, BLIP_CROSS, BLIP_STEP)}


class ClipImageGraph(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixel_values).pooler_output)


class ClipTextGraph(torch.nn.Module):
    """ids (N, T) -> projected features at each text's end token. CLIP's text tower is causal, so
    a batch needs only its longest text's tokens (T <= 77), not 77: the end token's output does
    not depend on what follows it (the term lists' texts are mostly under 10 tokens)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        return self.clip.text_projection(self.clip.text_model(input_ids=input_ids).pooler_output)


class BlipVisionGraph(torch.nn.Module):
    def __init__(self, blip):
        super().__init__()
        self.blip = blip

    def forward(self, pixel_values):
        return self.blip.vision_model(pixel_values=pixel_values)[0]


def _heads(x, heads: int):
    """(K, T, H*E) -> (K, H, T, E)"""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


class BlipCrossGraph(torch.nn.Module):
    """One image's tokens (1, P, C) -> every decoder layer's cross-attention keys and values
    (L, 2, 1, H, P, E): computed once per caption instead of at every step."""

    def __init__(self, blip):
        super().__init__()
        self.layers = blip.text_decoder.bert.encoder.layer
        self.heads = int(blip.config.text_config.num_attention_heads)

    def forward(self, image_embeds):
        out = []
        for layer in self.layers:
            att = layer.crossattention.self
            out.append(torch.stack([_heads(att.key(image_embeds), self.heads),
                                    _heads(att.value(image_embeds), self.heads)]))
        return torch.stack(out)


class BlipStepGraph(torch.nn.Module):
    """One decoder call over a key/value cache: new tokens (K, T) after R cached ones (``past``,
    (L, 2, K, H, R, E); R may be 0) and the image's cross keys/values -> the logits of the token
    after the last (K, V) and the cache extended by the new tokens. The computation of
    transformers' BLIP text decoder (BERT layers: self-attention, cross-attention, feed-forward,
    each with a residual LayerNorm; absolute positions), written over its modules' weights."""

    def __init__(self, blip):
        super().__init__()
        self.bert = blip.text_decoder.bert
        self.head = blip.text_decoder.cls.predictions
        self.heads = int(blip.config.text_config.num_attention_heads)

    def _attend(self, q, k, v, mask=None):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores + mask
        ctx = scores.softmax(-1) @ v                                  # (K, H, T, E)
        return ctx.transpose(1, 2).reshape(ctx.shape[0], ctx.shape[2], -1)

    def forward(self, input_ids, past, cross):
        emb = self.bert.embeddings
        cached, new = past.shape[4], input_ids.shape[1]
        positions = torch.arange(new, device=input_ids.device) + cached
        h = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None])
        # new token i sees every cached token and the new ones up to itself
        rows = torch.arange(new, device=input_ids.device)[:, None] + cached
        cols = torch.arange(cached + new, device=input_ids.device)[None, :]
        mask = torch.where(cols <= rows, 0.0, torch.finfo(h.dtype).min).to(h.dtype)
        present = []
        for i, layer in enumerate(self.bert.encoder.layer):
            sa = layer.attention.self
            k = torch.cat([past[i, 0], _heads(sa.key(h), self.heads)], dim=2)
            v = torch.cat([past[i, 1], _heads(sa.value(h), self.heads)], dim=2)
            present.append(torch.stack([k, v]))
            a = layer.attention.output
            h = a.LayerNorm(a.dense(self._attend(_heads(sa.query(h), self.heads), k, v, mask)) + h)
            ca = layer.crossattention
            ctx = self._attend(_heads(ca.self.query(h), self.heads), cross[i, 0], cross[i, 1])
            h = ca.output.LayerNorm(ca.output.dense(ctx) + h)
            inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
            h = layer.output.LayerNorm(layer.output.dense(inner) + h)
        return self.head(h[:, -1]), torch.stack(present)


def graph_module(models, name: str) -> torch.nn.Module:
    graphs = {"clip_image": lambda: ClipImageGraph(models.clip), "clip_text": lambda: ClipTextGraph(models.clip),
              "blip_vision": lambda: BlipVisionGraph(models.blip), "blip_cross": lambda: BlipCrossGraph(models.blip),
              "blip_step": lambda: BlipStepGraph(models.blip)}
    if name not in graphs:
        raise ValueError(f"interrogator network {name!r} is unknown; valid: {', '.join(graphs)}")
    return graphs[name]().eval()


def decoder_dims(models) -> tuple[int, int, int]:
    """(layers, heads, head width) of BLIP's text decoder: the cache's shape."""
    cfg = models.blip.config.text_config
    heads = int(cfg.num_attention_heads)
    return int(cfg.num_hidden_layers), heads, int(cfg.hidden_size) // heads


def sample_inputs(models, name: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    if name == "clip_image":
        return (torch.randn(1, 3, models.clip_size, models.clip_size, generator=g),)
    if name == "clip_text":
        return (torch.randint(0, int(models.clip.config.text_config.vocab_size), (2, 7), generator=g),)
    if name == "blip_vision":
        return (torch.randn(1, 3, models.blip_size, models.blip_size, generator=g),)
    with torch.no_grad():
        embeds = models.blip.vision_model(pixel_values=sample_inputs(models, "blip_vision")[0])[0]
        if name == "blip_cross":
            return (embeds,)
        cross = BlipCrossGraph(models.blip)(embeds)
    layers, heads, width = decoder_dims(models)
    ids = torch.randint(0, int(models.blip.config.text_config.vocab_size), (2, 2), generator=g)
    return ids, torch.randn(layers, 2, 2, heads, 3, width, generator=g), cross


def export_graph(models, name: str, path: Path, opset: int = OPSET) -> Path:
    return trace_to_onnx(graph_module(models, name), sample_inputs(models, name), INTERROGATOR_NETWORKS[name], path,
                         opset)


def _key(models, name: str, target: str) -> dict:
    weights = models.clip_hash if name.startswith("clip") else models.blip_hash
    return artifact_key(weights, name, "onnxruntime", "float32", "ort-extended" if target == "cpu" else "none", target,
                        spec=INTERROGATOR_NETWORKS[name])


def build_interrogator(models, engine_dir, target: str = "cpu", networks=None, force: bool = False, log=None) -> dict:
    """Export each interrogator network into ``engine_dir`` (float32 ONNX, ONNX Runtime's portable
    optimisations saved for the CPU), skipping those whose recorded artifact matches the weights,
    spec and versions. Returns the manifest."""
    log = log or (lambda message: None)
    networks = tuple(networks or INTERROGATOR_NETWORKS)
    unknown = [n for n in networks if n not in INTERROGATOR_NETWORKS]
    if unknown:
        raise ValueError(f"interrogator network(s) {', '.join(unknown)} unknown; valid: {', '.join(INTERROGATOR_NETWORKS)}")
    engine_dir = Path(engine_dir)
    with open_folder(engine_dir, log) as manifest:
        manifest.update(format=FORMAT, model=models.name, model_hash=models.model_hash, backend="onnxruntime",
                        kind="interrogator")
        for name in networks:
            key = _key(models, name, target)
            entry = manifest["networks"].get(name)
            check = check_artifact(engine_dir, entry, key)
            if check.ok and not force:
                log(f"{name}: up to date")
                continue
            if entry is not None:
                log(f"{name}: rebuilding: {check.reason}")

            def make(path, stage, name=name):
                with stage("export"):
                    export_graph(models, name, path)
                if target == "cpu":
                    with stage("optimise"):
                        ort_offline_optimize(path)
            path, files, seconds, _ = staged_onnx(engine_dir, name, make)
            manifest["networks"][name] = {
                "file": path.name, "files": files, "key": key, "key_digest": key_digest(key),
                "profile": {}, "build_seconds": seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_manifest(engine_dir, manifest)
            log(f"{name}: built in {sum(seconds.values()):.1f} s")
        write_manifest(engine_dir, manifest)
        return manifest


# the request shapes a TensorRT engine of each network serves: (min, opt, max) per input
TEXT_BATCH = (1, 256, 1024)        # list features are computed in batches of up to 1024 terms
BEAMS = (1, 1, 8)


def tensorrt_shapes(models, max_length: int = 64) -> dict[str, dict[str, tuple]]:
    """{network: {input: (min, opt, max) shape}}: one image for the towers and BLIP's encoder,
    up to 1024 texts of up to 77 tokens for CLIP's text tower, up to 8 beams for the decoder
    step, which takes the prompt (up to 16 tokens) over an empty cache, then one token over up
    to ``max_length`` cached ones (an empty dimension: TensorRT supports them). BLIP's image
    tokens are fixed by its image size."""
    cs, bs = models.clip_size, models.blip_size
    vcfg = models.blip.config.vision_config
    tokens, width = (bs // int(vcfg.patch_size)) ** 2 + 1, int(vcfg.hidden_size)
    layers, heads, head = decoder_dims(models)
    cross = (layers, 2, 1, heads, tokens, head)
    return {
        "clip_image": {"pixel_values": ((1, 3, cs, cs),) * 3},
        "clip_text": {"input_ids": ((1, 1), (256, 8), (1024, 77))},
        "blip_vision": {"pixel_values": ((1, 3, bs, bs),) * 3},
        "blip_cross": {"image_embeds": ((1, tokens, width),) * 3},
        "blip_step": {"input_ids": ((1, 1), (1, 1), (BEAMS[2], 16)),
                      "past": tuple((layers, 2, k, heads, r, head) for k, r in zip(BEAMS, (0, 16, max_length))),
                      "cross": (cross,) * 3},
    }
