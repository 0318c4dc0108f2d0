"""The Nemotron-3 hybrid model: config presets, mixers, decode cache, ``HybridLM``."""

from .cache import HybridCache, cache_bytes
from .config import HybridConfig
from .hybrid import HybridLM, ModelOutput

__all__ = ["HybridConfig", "HybridLM", "HybridCache", "ModelOutput", "cache_bytes"]
from .hf import load_pretrained, save_pretrained  # noqa: E402  (HF NemotronH checkpoints)
from .tokenizer import ByteTokenizer, generation_prefix, load_tokenizer, render_chat, render_message  # noqa: E402

__all__ += ["load_pretrained", "save_pretrained", "ByteTokenizer", "load_tokenizer", "render_chat",
            "render_message", "generation_prefix"]
