"""What a server replica loads and the limits it enforces: ``ServerConfig``, declared once; the
``sdrt serve`` flags are derived from it (``sdrt.options``). No web framework is imported here,
so the command line builds without the serving extras."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option


@dataclass
class ServerConfig:
    """What a server (each replica) loads and the limits it enforces (``sdrt serve``'s flags)."""

    model: str = option("random:tiny", "the model served first: a checkpoint file (.safetensors/.ckpt), a diffusers "
                                       "folder, or random:tiny, random:sd15, random:sdxl, ...")
    models_dir: str | None = option(None, "a folder of checkpoints (the web UI's --ckpt-dir): /sdapi/v1/sd-models "
                                          "lists them, sd_model_checkpoint picks one per request or for the server")
    max_models: int = option(2, "models kept loaded at once (least recently used unloaded first; the web UI's "
                                "sd_checkpoints_limit)")
    lora_dir: str | None = option(None, "the folder of the LoRAs prompts name (<lora:NAME:0.8>; the web UI's "
                                        "--lora-dir): /sdapi/v1/loras lists them")
    embeddings_dir: str | None = option(None, "the folder of the textual-inversion embeddings prompts name (the web "
                                              "UI's --embeddings-dir): /sdapi/v1/embeddings lists them")
    vae_dir: str | None = option(None, "the folder of the VAE files the sd_vae option names (the web UI's "
                                       "--vae-dir): /sdapi/v1/sd-vae lists them")
    backend: str = option("torch", "torch, onnxruntime or tensorrt")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: str = option("float32", "float32 or float16")
    engine_dir: str | None = option(None, "the engine folder (compiled backends; default: in the cache)")
    fast_path: bool = option(False, "the static loop: one CUDA graph per batch shape on a GPU")
    channels_last: bool = option(False, "torch backend: NHWC weights (Pipeline.tune)", cli=False)
    compile: str | None = option(None, "torch backend: torch.compile mode for the UNet (Pipeline.tune)", cli=False)
    quantize: str | None = option(None, "torch backend: 'fp8' for float8 linear layers in the UNet (Pipeline.tune)",
                                  cli=False)
    max_batch_size: int = option(8, "images per batch (dynamic batching, sdrt.Batcher)")
    max_wait: float = option(0.02, "seconds a partial batch waits for more requests")
    max_queue: int = option(256, "images waiting before the server answers 503")
    timeout: float | None = option(600.0, "seconds per image, queue included")
    threads: int | None = option(None, "torch threads per batcher worker (tiny models: 1; default: torch's)")
    max_images: int = option(16, "batch_size x n_iter per request")
    max_side: int = option(2048, "largest width or height in pixels")
    max_prompt_chars: int = option(20000, "characters of prompt + negative prompt")
    max_text_windows: int = option(256, "77-token windows of distinct text per request (prompt editing and "
                                         "alternation give one text per step): bounds the conditioning's memory")
    max_and_parts: int = option(16, "AND parts per image (each is a row of every UNet call)")
    max_image_steps: int = option(16 * 150, "images x steps per request")
    max_cfg_scale: float = option(100.0, "largest CFG scale, in magnitude (beyond it an image can overflow)")
    max_attention_weight: float = option(100.0, "largest attention weight of a token, (word:w) and brackets "
                                                "multiplied, in magnitude")
    max_body_bytes: int = option(1 << 20, "largest request body in bytes (chunked bodies too)")
    max_image_body_bytes: int = option(64 << 20, "largest request body in bytes on the routes that carry images "
                                       "(img2img, png-info)")
    body_timeout: float = option(30.0, "seconds a client has to send its whole request body (408 after)")
    api_auth: str | None = option(None, "HTTP Basic credentials user:pass[,user2:pass2] (the web UI's --api-auth): "
                                  "every route but /health needs them", metavar="USER:PASS")
    freeze_settings: bool = option(False, "refuse changes to the server's options (POST /sdapi/v1/options: 403)")
    interrogator: str = option("random:interrogator-tiny", "the model POST /sdapi/v1/interrogate loads on first use: "
                                                           "a folder with clip/ and blip/ (transformers' layout), or "
                                                           "random:interrogator-tiny, random:interrogator")
    interrogator_lists: str | None = option(None, "the interrogator's term lists, a folder of *.txt (the web UI's "
                                                  "interrogate/ folder; default: the clip-interrogator package's)")
