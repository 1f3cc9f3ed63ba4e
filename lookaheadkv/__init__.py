"""lookaheadkv: evict a long prompt's KV cache to a small budget, with LookaheadKV and its baselines."""

from . import drafts, lookahead  # noqa: F401  (register the methods `laq`, `speckv` and `lookahead`)
from .errors import LookaheadKVError
from .generate import Answer, evict, generate, generate_ids
from .methods import METHODS, Method, get_method
from .models import MODELS, load_model

__all__ = ["Answer", "LookaheadKVError", "METHODS", "MODELS", "Method", "evict", "generate", "generate_ids",
           "get_method", "load_model"]
__version__ = "0.1.0"
