"""lookaheadkv: evict a long prompt's KV cache to a small budget, with LookaheadKV and its baselines."""

from . import drafts, lookahead  # noqa: F401  (register the methods `laq`, `speckv` and `lookahead`)
from .cache import EvictableCache
from .errors import LookaheadKVError
from .generate import Answer, evict, generate, generate_ids
from .hf_generate import Evicting, evicting
from .methods import METHODS, Method, get_method
from .models import MODELS, load_model

__all__ = ["Answer", "EvictableCache", "Evicting", "LookaheadKVError", "METHODS", "MODELS", "Method", "evict",
           "evicting", "generate", "generate_ids", "get_method", "load_model"]
__version__ = "0.1.0"
