"""The interrogator's networks as export specs, graph modules and an engine folder: CLIP's image
and text towers (projected features), BLIP's vision encoder and its text decoder (the next
token's logits over the whole prefix: no key/value cache, captions are at most a few dozen
tokens). Built like the diffusion networks (``build.py``: keyed artifacts, manifest, staging,
lock), and declared for TensorRT by their profiles (``tensorrt_shapes``).
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .build import (
    _Stages,
    check_artifact,
    file_record,
    key_digest,
    open_folder,
    ort_offline_optimize,
    package_versions,
    staging,
    write_manifest,
)
from .onnx_export import OPSET, files_of, save_onnx
from .specs import NetworkSpec, TensorSpec, spec_fingerprint

CLIP_IMAGE = NetworkSpec("clip_image", inputs=(TensorSpec("pixel_values", ("B", 3, "S", "S")),),
                         outputs=(TensorSpec("image_embeds", ("B", "D")),))
CLIP_TEXT = NetworkSpec("clip_text", inputs=(TensorSpec("input_ids", ("N", 77), "int64"),),
                        outputs=(TensorSpec("text_embeds", ("N", "D")),))
BLIP_VISION = NetworkSpec("blip_vision", inputs=(TensorSpec("pixel_values", ("B", 3, "S", "S")),),
                          outputs=(TensorSpec("image_embeds", ("B", "P", "C")),))
BLIP_DECODER = NetworkSpec("blip_decoder",
                           inputs=(TensorSpec("input_ids", ("K", "T"), "int64"),
                                   TensorSpec("image_embeds", ("K", "P", "C"))),
                           outputs=(TensorSpec("logits", ("K", "V")),))
INTERROGATOR_NETWORKS = {s.name: s for s in (CLIP_IMAGE, CLIP_TEXT, BLIP_VISION, BLIP_DECODER)}
FORMAT = 1


class ClipImageGraph(torch.nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixel_values).pooler_output)


class ClipTextGraph(torch.nn.Module):
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


class BlipDecoderGraph(torch.nn.Module):
    """(ids (K, T), image embeddings (K, P, C)) -> the logits of the token after the last (K, V)."""

    def __init__(self, blip):
        super().__init__()
        self.decoder = blip.text_decoder

    def forward(self, input_ids, image_embeds):
        out = self.decoder(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           encoder_hidden_states=image_embeds, use_cache=False, return_dict=True)
        return out.logits[:, -1, :]


def graph_module(models, name: str) -> torch.nn.Module:
    graphs = {"clip_image": lambda: ClipImageGraph(models.clip), "clip_text": lambda: ClipTextGraph(models.clip),
              "blip_vision": lambda: BlipVisionGraph(models.blip), "blip_decoder": lambda: BlipDecoderGraph(models.blip)}
    if name not in graphs:
        raise ValueError(f"interrogator network {name!r} is unknown; valid: {', '.join(graphs)}")
    return graphs[name]().eval()


def sample_inputs(models, name: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    if name == "clip_image":
        return (torch.randn(1, 3, models.clip_size, models.clip_size, generator=g),)
    if name == "clip_text":
        return (torch.randint(0, int(models.clip.config.text_config.vocab_size), (2, 77), generator=g),)
    if name == "blip_vision":
        return (torch.randn(1, 3, models.blip_size, models.blip_size, generator=g),)
    with torch.no_grad():
        embeds = models.blip.vision_model(pixel_values=sample_inputs(models, "blip_vision")[0])[0]
    ids = torch.randint(0, int(models.blip.config.text_config.vocab_size), (2, 5), generator=g)
    return ids, embeds.expand(2, -1, -1).contiguous()


def export_graph(models, name: str, path: Path, opset: int = OPSET) -> Path:
    import onnx

    spec = INTERROGATOR_NETWORKS[name]
    module = graph_module(models, name)
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, sample_inputs(models, name), str(raw), input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        save_onnx(onnx.load(str(raw), load_external_data=True), path)
    return path


def _key(models, name: str, target: str) -> dict:
    weights = models.clip_hash if name.startswith("clip") else models.blip_hash
    return {"model_hash": weights, "network": name, "spec": spec_fingerprint(INTERROGATOR_NETWORKS[name]),
            "backend": "onnxruntime", "precision": "float32", "target": target, "opset": OPSET,
            "optimization": "ort-extended" if target == "cpu" else "none", "versions": package_versions(),
            "format": FORMAT}


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
            stage = _Stages(name, None)
            with staging(engine_dir, name) as work:
                path = work / f"{name}.onnx"
                with stage("export"):
                    export_graph(models, name, path)
                if target == "cpu":
                    with stage("optimise"):
                        ort_offline_optimize(path)
                with stage("save"):
                    for p in files_of(path):
                        os.replace(p, engine_dir / p.name)
                    path = engine_dir / path.name
                    files = [file_record(p) for p in files_of(path)]
            manifest["networks"][name] = {
                "file": path.name, "files": files, "key": key, "key_digest": key_digest(key),
                "profile": {}, "build_seconds": stage.seconds, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_manifest(engine_dir, manifest)
            log(f"{name}: built in {sum(stage.seconds.values()):.1f} s")
        write_manifest(engine_dir, manifest)
        return manifest


# the request shapes a TensorRT engine of each network serves: (min, opt, max) per input
TEXT_BATCH = (1, 256, 1024)        # list features are computed in batches of up to 1024 terms
BEAMS = (1, 1, 8)


def tensorrt_shapes(models, max_length: int = 64) -> dict[str, dict[str, tuple]]:
    """{network: {input: (min, opt, max) shape}}: one image for the towers and BLIP's encoder,
    up to 1024 texts for CLIP's text tower, up to 8 beams of up to ``max_length`` tokens for the
    decoder (BLIP's image tokens are fixed by its image size)."""
    cs, bs = models.clip_size, models.blip_size
    vcfg = models.blip.config.vision_config
    tokens = (bs // int(vcfg.patch_size)) ** 2 + 1
    width = int(vcfg.hidden_size)
    one = ((1, 3, cs, cs),) * 3
    return {
        "clip_image": {"pixel_values": one},
        "clip_text": {"input_ids": tuple((n, 77) for n in TEXT_BATCH)},
        "blip_vision": {"pixel_values": ((1, 3, bs, bs),) * 3},
        "blip_decoder": {"input_ids": tuple((k, t) for k, t in zip(BEAMS, (1, 16, max_length))),
                         "image_embeds": tuple((k, tokens, width) for k in BEAMS)},
    }
