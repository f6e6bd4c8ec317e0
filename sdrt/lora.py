"""LoRA as the web UI uses it: ``<lora:NAME:MULTIPLIER>`` in a prompt, files from a LoRA folder,
merged into the weights for the whole generation and restored exactly afterwards.

- **Syntax** (the web UI's extra networks): ``<lora:name>``, ``<lora:name:m>``,
  ``<lora:name:te:unet>`` and the named forms ``te=``/``unet=`` (``unet`` defaults to ``te``).
  Every ``<type:...>`` is removed from the text before tokenizing; as in the web UI the first
  image's prompt decides the batch's LoRA set (negative prompts are left as they are). The infotext
  keeps the prompt as written and adds ``Lora hashes`` as the web UI writes it.
- **Files**: kohya / web UI layout (``lora_unet_*``, ``lora_te_*``, SDXL's ``lora_te1_*`` /
  ``lora_te2_*``; ``lora_down`` / ``lora_up`` / ``alpha``; the UNet named after diffusers' modules
  or after the original LDM ones, as kohya writes SDXL's), and diffusers / peft files
  (``unet.*.lora_A.weight`` / ``lora_B``). Plain LoRA on linear layers and LoCon on convolutions.
  The LDM names come from the same layout map that writes single-file checkpoints
  (``sdrt.checkpoints``), which diffusers' own converters read back.
- **Merge**: ``W = W0 + sum(multiplier * alpha / rank * up @ down)`` computed in float32, written
  in place (tensor addresses do not change: captured CUDA graphs and compiled modules stay
  valid); ``W0`` is kept (on the CPU, as the web UI does) for the weights a LoRA touched, and
  restoring copies it back, so any number of swaps returns the model bitwise.
- **Hash** (``Lora hashes``): the first 12 hex digits of kohya's hash, the sha256 of a
  safetensors file's tensor data after its header (the web UI's ``addnet_hash_safetensors``; the
  whole file for other formats), or the file's ``sshs_model_hash`` metadata when present.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import files_under, folder_arg

logger = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
_RE_EXTRA = re.compile(r"<(\w+):([^>]+)>")          # the web UI's re_extra_net
NETWORK_TYPES = ("lora", "lyco")                     # lyco: LyCORIS's old tag, the same networks


class LoraError(ValueError):
    """A LoRA that cannot be used: not found, unreadable, or not for this model."""


# ---------------------------------------------------------------------------- syntax

@dataclass(frozen=True)
class LoraUse:
    """One ``<lora:...>`` of a prompt: the name and the text-encoder and UNet multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    @classmethod
    def parse(cls, args: str) -> "LoraUse":
        items = args.split(":")
        positional = [i for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        if not positional or not positional[0].strip():
            raise ValueError(f"<lora:{args}>: give a name, as in <lora:NAME:0.8>")
        try:
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else te
            unet = float(named.get("unet", unet))
        except ValueError:
            raise ValueError(f"<lora:{args}>: the multipliers must be numbers (<lora:NAME:TE:UNET> or "
                             "te=/unet=)") from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise ValueError(f"<lora:{args}>: the multipliers must be finite")
        return cls(positional[0].strip(), te, unet)


def split_extra_networks(prompt: str) -> tuple[str, tuple[LoraUse, ...]]:
    """(the prompt without its ``<type:...>`` tags, the LoRAs it asks for). A tag of another type
    (``<hypernet:...>``) is a ValueError: sdrt has no such networks, and generating without what
    the prompt asks for would be a silent failure."""
    found: list[LoraUse] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        if kind not in NETWORK_TYPES:
            raise ValueError(f"<{kind}:{args}>: extra networks of type {kind!r} are not supported by sdrt "
                             f"(it has {', '.join(NETWORK_TYPES)})")
        found.append(LoraUse.parse(args))
        return ""

    return _RE_EXTRA.sub(take, prompt), tuple(found)


# ---------------------------------------------------------------------------- files

def lora_hash(path: Path) -> str:
    """kohya's hash as the web UI shows it (12 digits): sha256 of a safetensors file's data after
    its header, or of the whole file; ``sshs_model_hash`` metadata when the file carries it."""
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            try:
                meta = json.loads(f.read(n)).get("__metadata__") or {}
                if isinstance(meta.get("sshs_model_hash"), str) and meta["sshs_model_hash"]:
                    return meta["sshs_model_hash"][:12]
            except ValueError:
                pass
            f.seek(8 + n)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


@dataclass
class LoraFile:
    """A parsed LoRA: per target module (``part``, diffusers module name), its factors."""

    name: str
    path: Path
    hash: str
    layers: dict = field(default_factory=dict)     # (part, module) -> (down, up, alpha or None)


def _read(path: Path) -> dict:
    from .checkpoints import CheckpointError, read_state_dict
    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        raise LoraError(str(e).replace("checkpoint", "LoRA file")) from None
    return sd


def parse_file(name: str, path: Path, names: "ModuleNames") -> LoraFile:
    """Read a LoRA file and match its layers to the model's modules (LoraError naming the file
    and the first layer that does not fit)."""
    sd = _read(path)
    lora = LoraFile(name=name, path=path, hash=lora_hash(path))
    groups: dict[str, dict] = {}
    for key, value in sd.items():
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):       # kohya / web UI
            base, _, part = key.partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part, part)
        else:                                                                           # diffusers / peft
            m = re.match(r"^(.*)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$", key)
            if m:
                base, part = m.group(1), "down" if m.group(2) in ("lora_A", "lora.down", "lora_down") else "up"
            elif key.endswith(".alpha"):
                base, part = key[:-len(".alpha")], "alpha"
            else:
                base, part = key, key
        groups.setdefault(base, {})[part] = value
    if not groups:
        raise LoraError(f"{str(path)!r}: holds no tensors")
    for base, parts in groups.items():
        unknown = set(parts) - {"down", "up", "alpha"}
        if unknown:
            raise LoraError(f"{str(path)!r}: layer {base!r} has {sorted(unknown)}: sdrt applies plain LoRA and LoCon "
                            "(down, up, alpha), not LoHa, LoKr, DoRA or other LyCORIS types")
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{str(path)!r}: layer {base!r} lacks its {'down' if 'down' not in parts else 'up'} "
                            "weight (a damaged file?)")
        target = names.resolve(base)
        if target is None:
            raise LoraError(f"{str(path)!r}: layer {base!r} has no module in this model "
                            f"({names.family_hint(base)})")
        module = names.module(*target)
        down, up = parts["down"].float(), parts["up"].float()
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        try:
            delta_shape = _delta(down, up, 1.0, None).shape
        except RuntimeError:
            raise LoraError(f"{str(path)!r}: layer {base!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do "
                            "not multiply") from None
        if math.prod(delta_shape) != module.weight.numel():
            raise LoraError(f"{str(path)!r}: layer {base!r} gives a {tuple(delta_shape)} change for a weight of "
                            f"{tuple(module.weight.shape)} ({names.family_hint(base)})")
        lora.layers[target] = (down, up, alpha)
    return lora


def _delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """``up @ down * scale`` for linear (rank, in) and convolution (rank, in, kh, kw) LoRAs."""
    d = up.flatten(1) @ down.flatten(1)
    if down.dim() == 4:
        d = d.reshape(up.shape[0], *down.shape[1:])
    d = d * scale
    return d.reshape(shape) if shape is not None else d


class ModuleNames:
    """The LoRA names of a model's modules: kohya's (``lora_unet_`` + the diffusers or the LDM
    module name, ``lora_te_``/``lora_te1_``/``lora_te2_`` + the transformers name with
    ``text_model``) and diffusers/peft's (``unet.``/``text_encoder.``/``text_encoder_2.`` + name)."""

    def __init__(self, components):
        from .checkpoints import unet_ldm_names
        self.components = components
        self.sdxl = components.is_sdxl
        self.modules: dict[str, dict[str, torch.nn.Module]] = {}
        self.names: dict[str, tuple[str, str]] = {}
        parts = {"unet": components.unet, "text_encoder": components.text_encoder}
        if components.text_encoder_2 is not None:
            parts["text_encoder_2"] = components.text_encoder_2
        for part, root in parts.items():
            self.modules[part] = {n: m for n, m in root.named_modules()
                                  if isinstance(getattr(m, "weight", None), torch.Tensor) and n}
        for name in self.modules["unet"]:
            self._add("unet", name, "lora_unet_" + name.replace(".", "_"))
        # the LDM names of the same modules (kohya trains SDXL on the original UNet)
        weights = [n + ".weight" for n in self.modules["unet"]]
        for key, ldm_key in unet_ldm_names(components.unet.config, weights).items():
            self._add("unet", key[:-len(".weight")], "lora_unet_" + ldm_key[:-len(".weight")].replace(".", "_"))
        te_prefixes = {"text_encoder": ("lora_te1_" if self.sdxl else "lora_te_",), "text_encoder_2": ("lora_te2_",)}
        for part in ("text_encoder", "text_encoder_2"):
            for name in self.modules.get(part, {}):
                full = name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name
                for prefix in te_prefixes[part]:
                    self._add(part, name, prefix + full.replace(".", "_"))
                self._add(part, name, f"{part}.{full}")
                self._add(part, name, f"{part}.{name}")
        for name in self.modules["unet"]:
            self._add("unet", name, f"unet.{name}")

    def _add(self, part: str, module: str, lora_name: str) -> None:
        self.names.setdefault(lora_name, (part, module))

    def resolve(self, lora_name: str) -> tuple[str, str] | None:
        return self.names.get(lora_name)

    def module(self, part: str, name: str) -> torch.nn.Module:
        return self.modules[part][name]

    def family_hint(self, lora_name: str) -> str:
        if lora_name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) and not self.sdxl:
            return "a LoRA for SDXL; this model is not SDXL"
        if lora_name.startswith("lora_te_") and self.sdxl:
            return "a LoRA for SD 1.x/2.x; this model is SDXL"
        return "a LoRA for another model family or architecture?"


# ---------------------------------------------------------------------------- the library

class LoraLibrary:
    """The LoRA files of a folder (searched recursively), by name: the file's stem, or its path
    under the folder without the extension. Parsed files are kept (``cache_size`` most recent)."""

    def __init__(self, folder: str | Path | None, cache_size: int = 8):
        self.folder = folder_arg("lora_dir", folder)
        self.cache_size = cache_size
        self._parsed: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.files: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        files: dict[str, Path] = {}
        for p in files_under(self.folder, SUFFIXES):
            files.setdefault(p.relative_to(self.folder).with_suffix("").as_posix(), p)
            files.setdefault(p.stem, p)
        with self._lock:
            self.files = files
            self._parsed.clear()

    def listing(self) -> list[dict]:
        """The web UI's ``/sdapi/v1/loras`` entries."""
        seen, out = set(), []
        for path in self.files.values():
            if path in seen:
                continue
            seen.add(path)
            out.append({"name": path.stem, "alias": path.stem, "path": str(path), "metadata": {}})
        return out

    def path_of(self, name: str) -> Path:
        path = self.files.get(name)
        if path is None:
            where = f"in {self.folder}" if self.folder else "(no LoRA folder is set: lora_dir / --lora-dir)"
            known = ", ".join(sorted({p.stem for p in self.files.values()})[:20])
            raise LoraError(f"LoRA {name!r} was not found {where}" + (f"; available: {known}" if known else ""))
        return path

    def get(self, name: str, names: ModuleNames) -> LoraFile:
        path = self.path_of(name)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, id(names))
        with self._lock:
            if key in self._parsed:
                self._parsed.move_to_end(key)
                return self._parsed[key]
        lora = parse_file(name, path, names)
        with self._lock:
            self._parsed[key] = lora
            while len(self._parsed) > self.cache_size:
                self._parsed.popitem(last=False)
        return lora


# ---------------------------------------------------------------------------- merging

PARTS = {"text": ("text_encoder", "text_encoder_2"), "unet": ("unet",)}


class LoraState:
    """Which LoRA set is merged into a model's weights, per part ("text": the text encoders,
    "unet"), each changed on its own (the batcher encodes the next batch's text while this one
    denoises). ``apply`` restores the original weights, then merges the set."""

    def __init__(self, components, library: LoraLibrary):
        self.components, self.library = components, library
        self.names = ModuleNames(components)
        self.current = {"text": (), "unet": ()}
        self._backup: dict[tuple[str, str], torch.Tensor] = {}
        self._locks = {"text": threading.Lock(), "unet": threading.Lock()}

    def resolve(self, uses: tuple[LoraUse, ...]) -> list[tuple[LoraFile, LoraUse]]:
        """Every LoRA of a job, read and matched (LoraError before anything is changed)."""
        return [(self.library.get(u.name, self.names), u) for u in uses]

    def apply(self, part: str, uses: tuple[LoraUse, ...]) -> None:
        want = tuple(uses)
        with self._locks[part]:
            if self.current[part] == want:
                return
            loras = self.resolve(want)          # may raise: the weights are untouched then
            targets: dict[tuple[str, str], list] = {}
            for lora, use in loras:
                mult = use.te if part == "text" else use.unet
                for (p, m), (down, up, alpha) in lora.layers.items():
                    if p in PARTS[part] and mult != 0.0:
                        scale = mult * (alpha / down.shape[0] if alpha is not None else 1.0)
                        targets.setdefault((p, m), []).append((down, up, scale))
            with torch.no_grad():
                # weights the new set leaves alone: back to the model's own
                for key in [k for k in self._backup if k[0] in PARTS[part] and k not in targets]:
                    self.names.module(*key).weight.copy_(self._backup.pop(key))
                # the others: W0 + the new deltas, straight from the kept W0 (one write per weight)
                for key, factors in targets.items():
                    weight = self.names.module(*key).weight
                    if key not in self._backup:
                        self._backup[key] = weight.detach().to("cpu", copy=True)
                    merged = self._backup[key].to(weight.device, torch.float32, copy=True)
                    for d, u, s in factors:
                        merged += _delta(d.to(weight.device), u.to(weight.device), s, weight.shape)
                    weight.copy_(merged)
            self.current[part] = want

    def original(self, part: str, module: str) -> torch.Tensor | None:
        """The model's own weight of a module (its kept copy while a LoRA changes it)."""
        kept = self._backup.get((part, module))
        if kept is not None:
            return kept
        m = self.names.modules[part].get(module)
        return None if m is None else m.weight

    def changed(self, part: str) -> list[str]:
        """The modules of network ``part`` whose weights a LoRA changes now."""
        return [m for p, m in self._backup if p == part]

    def graph_values(self, network: str, modules, graph, where, fix: str) -> dict:
        """{initializer: array} giving ``modules`` of ``network`` their current weights in a compiled
        graph (``sdrt.export.onnx_export.GraphWeights``); ValueError naming the module and ``fix``
        when the graph holds no such weight."""
        out = {}
        for module in modules:
            place = graph.place(module, self.original(network, module))
            if place is None:
                raise ValueError(f"LoRA: the {network} graph in {where} holds no weight equal to {module}'s ({fix})")
            out[place[0]] = graph.array(place, self.names.module(network, module).weight)
        return out

    def _restore(self, part: str) -> None:
        with torch.no_grad():
            for (p, m), original in list(self._backup.items()):
                if p in PARTS[part]:
                    self.names.module(p, m).weight.copy_(original)
                    del self._backup[(p, m)]
        self.current[part] = ()

    def restore(self) -> None:
        """The model's own weights again, bitwise."""
        for part in ("text", "unet"):
            with self._locks[part]:
                self._restore(part)

    def hashes(self, uses: tuple[LoraUse, ...]) -> str | None:
        """The web UI's ``Lora hashes`` value: "name: hash, ..." (":" and "," removed from names)."""
        if not uses:
            return None
        table = str.maketrans("", "", ":,")
        return ", ".join(f"{u.name.translate(table)}: {self.library.get(u.name, self.names).hash}" for u in uses)
