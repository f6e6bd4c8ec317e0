"""Each exported network declared as data: input/output names, symbolic dimensions, and the
shape range (profile) an artifact is built for. Read by the ONNX exporter, the engine
builders and the runtime alike.

Symbolic dimensions: ``B`` rows of a batch, ``H``/``W`` latent height/width, ``S`` text length
(77 per window), ``N`` text windows, ``L`` text encoder layers, ``C`` hidden size, ``IH``/``IW``
image height/width (``H * f``, ``W * f`` for the VAE's scale factor f).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

Precision = Literal["float32", "float16"]
PRECISIONS = ("float32", "float16")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple            # ints or symbolic names
    dtype: str = "float32"  # float inputs follow the graph's precision only where marked "float"


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
                for t in self.inputs + self.outputs}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


TEXT_ENCODER = NetworkSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", ("N", 77), "int64"),),
    # every layer's hidden state after the final layer norm: CLIP skip picks one at run time
    outputs=(TensorSpec("hidden_states", ("L", "N", 77, "C")),),
)
UNET = NetworkSpec(
    "unet",
    inputs=(TensorSpec("sample", ("B", 4, "H", "W")), TensorSpec("timestep", ("B",)),
            TensorSpec("encoder_hidden_states", ("B", "S", "C"))),
    outputs=(TensorSpec("out_sample", ("B", 4, "H", "W")),),
)
VAE_DECODER = NetworkSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent", ("B", 4, "H", "W")),),       # UNet latent space (scaled)
    outputs=(TensorSpec("image", ("B", 3, "IH", "IW")),),       # [-1, 1]
)
VAE_ENCODER = NetworkSpec(
    "vae_encoder",
    inputs=(TensorSpec("image", ("B", 3, "IH", "IW")),),
    # the posterior's moments, unscaled: mean (4 channels) then log-variance (4); the pipeline
    # samples from it and applies the scaling factor (sdrt.img2img.sample_latents)
    outputs=(TensorSpec("moments", ("B", 8, "H", "W")),),
)
# the text encoders again, reading the token embeddings from an input instead of their table:
# textual-inversion vectors go in at their positions (built when a prompt first names one); the
# token ids stay an input for the end token's position (the pooled output)
TEXT_ENCODER_EMBEDS = NetworkSpec(
    "text_encoder_embeds",
    inputs=TEXT_ENCODER.inputs + (TensorSpec("inputs_embeds", ("N", 77, "C")),),
    outputs=TEXT_ENCODER.outputs,
)
NETWORKS = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, TEXT_ENCODER_EMBEDS)}
DEFAULT_NETWORKS = ("text_encoder", "unet", "vae_decoder")

# SDXL: both text encoders give their penultimate layer without the final norm (CLIP skip does not
# apply), the second also its pooled projection ("P"); the UNet takes the pooled text and the six
# size values beside the context (C = C1 + C2 = 2048 at full size)
TEXT_ENCODER_XL = NetworkSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", ("N", 77), "int64"),),
    outputs=(TensorSpec("hidden_states", ("N", 77, "C1")),),
)
TEXT_ENCODER_2 = NetworkSpec(
    "text_encoder_2",
    inputs=(TensorSpec("input_ids", ("N", 77), "int64"),),
    outputs=(TensorSpec("hidden_states", ("N", 77, "C2")), TensorSpec("text_embeds", ("N", "P"))),
)
UNET_XL = NetworkSpec(
    "unet",
    inputs=UNET.inputs + (TensorSpec("text_embeds", ("B", "P")), TensorSpec("time_ids", ("B", 6))),
    outputs=UNET.outputs,
)
TEXT_ENCODER_XL_EMBEDS = NetworkSpec(
    "text_encoder_embeds", inputs=TEXT_ENCODER_XL.inputs + (TensorSpec("inputs_embeds", ("N", 77, "C1")),),
    outputs=TEXT_ENCODER_XL.outputs)
TEXT_ENCODER_2_EMBEDS = NetworkSpec(
    "text_encoder_2_embeds", inputs=TEXT_ENCODER_2.inputs + (TensorSpec("inputs_embeds", ("N", 77, "C2")),),
    outputs=TEXT_ENCODER_2.outputs)
SDXL_NETWORKS = {s.name: s for s in (TEXT_ENCODER_XL, TEXT_ENCODER_2, UNET_XL, VAE_DECODER, VAE_ENCODER,
                                     TEXT_ENCODER_XL_EMBEDS, TEXT_ENCODER_2_EMBEDS)}
SDXL_DEFAULT_NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


# networks an SDXL float16 build keeps in float32: SDXL's VAE decoder overflows float16 (the
# "NaN VAE"); the fp16-fix VAE would not, but a checkpoint's own VAE may be either
FLOAT32_NETWORKS = ("vae_decoder", "vae_encoder")


def network_specs(sdxl: bool) -> dict[str, NetworkSpec]:
    """The export specs of a model family: SD 1.x/2.x, or SDXL (``Components.is_sdxl``)."""
    return SDXL_NETWORKS if sdxl else NETWORKS


def default_networks(sdxl: bool) -> tuple[str, ...]:
    """What a backend runs: the text encoder(s), the UNet and the VAE decoder."""
    return SDXL_DEFAULT_NETWORKS if sdxl else DEFAULT_NETWORKS


@dataclass(frozen=True)
class Profile:
    """The request shapes an artifact serves: images per batch, pixel sizes, text windows.
    Each is (min, opt, max); opt is what the builder tunes for."""

    batch: tuple[int, int, int] = (1, 1, 4)
    height: tuple[int, int, int] = (256, 512, 1024)
    width: tuple[int, int, int] = (256, 512, 1024)
    windows: tuple[int, int, int] = (1, 1, 4)

    def __post_init__(self):
        for name in ("batch", "height", "width", "windows"):
            lo, opt, hi = getattr(self, name)
            if not (1 <= lo <= opt <= hi):
                raise ValueError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")

    @classmethod
    def parse(cls, min_shape: str | None, opt_shape: str | None, max_shape: str | None,
              windows: tuple[int, int, int] | None = None, default: "Profile | None" = None) -> "Profile":
        """From ``BxHxW`` strings (images x pixel height x pixel width), as ``sdrt build`` takes them."""
        base = default or cls()

        def split(text, field):
            if text is None:
                return None
            try:
                b, h, w = (int(v) for v in str(text).lower().split("x"))
            except ValueError:
                raise ValueError(f"--{field} must look like BxHxW (e.g. 1x512x512), got {text!r}") from None
            return b, h, w

        shapes = [split(min_shape, "min"), split(opt_shape, "opt"), split(max_shape, "max")]
        fields = {}
        for i, name in enumerate(("batch", "height", "width")):
            cur = list(getattr(base, name))
            for j in range(3):
                if shapes[j] is not None:
                    cur[j] = shapes[j][i]
            fields[name] = tuple(cur)
        return cls(windows=windows or base.windows, **fields)

    def covers(self, batch: int, height: int, width: int, windows: int) -> str | None:
        """None when the request fits, else what does not."""
        for name, v in (("batch", batch), ("height", height), ("width", width), ("windows", windows)):
            lo, _, hi = getattr(self, name)
            if not lo <= v <= hi:
                return f"{name} {v} is outside the engine's profile {name} range {lo}..{hi}"
        return None

    def describe(self) -> str:
        return (f"batch {self.batch[0]}..{self.batch[2]}, {self.height[0]}..{self.height[2]} x "
                f"{self.width[0]}..{self.width[2]} px, {self.windows[0]}..{self.windows[2]} text windows")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        return cls(**{k: tuple(v) for k, v in d.items()})


def default_profile(latent_factor: int, native_size: int) -> Profile:
    """A dynamic profile around the model's native size (512 for SD 1.5, 64 for random:tiny)."""
    lo = max(latent_factor, native_size // 2)
    return Profile(height=(lo, native_size, native_size * 2), width=(lo, native_size, native_size * 2))


def spec_fingerprint(spec: NetworkSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True)


@dataclass(frozen=True)
class ModelDims:
    """Sizes the profiles need that the export specs leave symbolic."""

    latent_factor: int        # pixels per latent cell
    latent_channels: int = 4
    hidden: int = 768         # text hidden size C (SDXL: both encoders together, C1 + C2)
    layers: int = 12          # text encoder layers L
    sdxl: bool = False
    hidden_1: int = 0         # SDXL: the first encoder's width C1 (the second's is hidden - hidden_1)
    pooled: int = 0           # SDXL: the pooled text width P
    unet_in_channels: int = 4  # 9 for inpainting models (latents, mask, masked-image latents)


def profile_shapes(network: str, profile: Profile, dims: ModelDims) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input name: (min, opt, max) shape} for one network. UNet rows are 2 per image (CFG:
    cond + uncond); text rows are 77-token windows of up to 2 texts per image."""
    specs = network_specs(dims.sdxl)
    if network not in specs:
        raise ValueError(f"network {network!r} is unknown; valid: {', '.join(specs)}")
    f = dims.latent_factor
    b = profile.batch
    h = tuple(v // f for v in profile.height)
    w = tuple(v // f for v in profile.width)
    k = profile.windows
    out = {}
    for i in range(3):
        values = {"B": b[i], "H": h[i], "W": w[i], "IH": profile.height[i], "IW": profile.width[i]}
        if network == "unet":
            values.update(B=2 * b[i], S=77 * k[i], C=dims.hidden, P=dims.pooled)
        if network.startswith("text_encoder"):
            values.update(N=(1 if i == 0 else 2 * b[i] * k[i]), C=dims.hidden, C1=dims.hidden_1 or dims.hidden,
                          C2=dims.hidden - dims.hidden_1)
        for t in specs[network].inputs:
            four = dims.unet_in_channels if (network, t.name) == ("unet", "sample") else dims.latent_channels
            shape = tuple(values[d] if isinstance(d, str) else (four if d == 4 else d) for d in t.dims)
            out.setdefault(t.name, [None, None, None])[i] = shape
    return {name: tuple(v) for name, v in out.items()}


def model_dims(components) -> ModelDims:
    tcfg = components.text_encoder.config
    if not components.is_sdxl:
        return ModelDims(components.latent_factor, components.latent_channels, int(tcfg.hidden_size),
                         int(tcfg.num_hidden_layers), unet_in_channels=int(components.unet.config.in_channels))
    t2 = components.text_encoder_2.config
    return ModelDims(components.latent_factor, components.latent_channels,
                     int(tcfg.hidden_size) + int(t2.hidden_size), int(tcfg.num_hidden_layers), sdxl=True,
                     hidden_1=int(tcfg.hidden_size), pooled=int(t2.projection_dim),
                     unet_in_channels=int(components.unet.config.in_channels))
