"""Models to time: random-weight models of published shapes (speed does not depend on weight values), or a
named model with its real weights (models.load_model)."""

from __future__ import annotations

import torch

from ..attention import install
from ..errors import LookaheadKVError

RANDOM_NOTE = "random weights: speed does not depend on weight values"

# Architecture fields of the published configs (Meta's Llama-3.1-8B and Llama-3.2-1B, Qwen's Qwen3-8B); the
# position limit is raised so long contexts can be timed (RoPE is computed per position, nothing is sized by it).
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                               rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True)),
    # The default model's shape (HuggingFaceTB's SmolLM2-135M-Instruct config), for its timings without its files.
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True)),
    # Seconds-long CPU tests.
    "tiny": ("llama", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)),
}


def config_of(name: str, **overrides):
    from transformers import AutoConfig

    if name not in SHAPES:
        raise LookaheadKVError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    model_type, fields = SHAPES[name]
    cfg = AutoConfig.for_model(model_type, max_position_embeddings=1 << 20, **{**fields, **overrides})
    cfg.name_or_path = f"random:{name}"
    return cfg


def from_config(cfg, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised causal LM built directly on `device`, with our attention installed. EOS is
    switched off, so drafts always run their full length (a random model would stop at random)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    model.name_or_path = cfg.name_or_path
    model.generation_config.eos_token_id = None
    model.tokenizer_sha256 = f"{cfg.vocab_size} token ids, no tokenizer (random weights)"  # what SpecKV compares
    return install(model)


def build(name: str, device: str, dtype: torch.dtype, random_weights: bool = False, vocab_size: int | None = None,
          device_map: str | dict | None = None):
    """(model, note): a shape from SHAPES (random weights), or a named model / path, its real weights unless
    `random_weights` (then its config with random weights). vocab_size overrides a shape's (draft models).
    device_map: the model spread over several devices by accelerate (random weights: built on the CPU, then
    placed) instead of put on `device`."""
    if name in SHAPES:
        cfg = config_of(name, **({"vocab_size": vocab_size} if vocab_size else {}))
        return _placed(cfg, device, dtype, device_map), RANDOM_NOTE
    from ..models import load_model, resolve

    if not random_weights:
        model, _ = load_model(name, device=device, dtype=dtype, device_map=device_map)
        model.eval().requires_grad_(False)
        model.generation_config.eos_token_id = None  # drafts run their full length, as on random models
        return model, "real weights"
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve(name))
    cfg.name_or_path = f"random:{name}"
    return _placed(cfg, device, dtype, device_map), RANDOM_NOTE


def _placed(cfg, device: str, dtype: torch.dtype, device_map: str | dict | None):
    """A random-weight model on `device`, or built on the CPU and dispatched by accelerate over `device_map`: a
    strategy is resolved by accelerate's infer_auto_device_map, decoder layers kept whole, over memory balanced
    across the GPUs ("sequential": filling them in order)."""
    if device_map is None:
        return from_config(cfg, device, dtype)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    from ..models import check_placement

    model = from_config(cfg, "cpu", dtype)
    whole = model._no_split_modules
    memory = None if device_map == "sequential" else get_balanced_memory(
        model, no_split_module_classes=whole, dtype=dtype, low_zero=device_map == "balanced_low_0")
    placement = device_map if isinstance(device_map, dict) else infer_auto_device_map(
        model, max_memory=memory, no_split_module_classes=whole, dtype=dtype)
    model = dispatch_model(model, placement)
    model.hf_device_map = placement
    check_placement(model)
    return model


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
