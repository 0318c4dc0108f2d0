"""The Nemotron-3 hybrid model: config presets, mixers, decode cache, ``HybridLM``."""

from .cache import HybridCache, cache_bytes
from .config import HybridConfig
from .hybrid import HybridLM, ModelOutput

__all__ = ["HybridConfig", "HybridLM", "HybridCache", "ModelOutput", "cache_bytes"]
