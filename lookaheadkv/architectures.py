"""What eviction needs from a decoder architecture, read from the model itself, and the refusal of those
it cannot serve exactly.

Eviction works on any transformers decoder whose attention goes through the attention-function registry
and whose cache layers are plain or sliding-window key/value layers: Llama, Qwen2/3, Mistral, Gemma 2/3,
Phi-3, Qwen2-MoE, Mixtral and their kin. Everything model-specific is found here rather than assumed:
the text config (nested in multimodal Gemma 3), each layer's sliding window (as transformers' own cache
sees it), and the linear layers the lookahead LoRA goes on (fused ones on Phi-3; on MoE models the
attention only, as their experts see flattened tokens). Anything else is refused with one line saying
what is missing, at load time and on entering `evicting`.
"""

from __future__ import annotations

import re

import torch
from transformers import DynamicCache

from .errors import LookaheadKVError

# Cache layer types we evict: what transformers builds for them is a plain or a sliding-window layer.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
_WHY = {
    "chunked_attention": "attention in fixed chunks, not a sliding window",
    "linear_attention": "a recurrent state, no per-token entries to evict",
    "conv": "a convolution state, no per-token entries to evict",
    "hybrid": "recurrent and attention state in one layer",
    "hybrid_sliding": "recurrent and attention state in one layer",
    "dummy": "layers that share another layer's KV cache",
}


def text_config(config):
    """The decoder's config: the config itself, or the text config a multimodal model nests (Gemma 3)."""
    return config.get_text_config(decoder=True)


def n_layers(model) -> int:
    return text_config(model.config).num_hidden_layers


def kv_heads(model) -> int:
    cfg = text_config(model.config)
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def layer_types(config) -> list[str]:
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"] * \
            cfg.num_hidden_layers
    return list(types)


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers' own cache is built for it."""
    probe = DynamicCache(config=config)
    return [layer.sliding_window if getattr(layer, "is_sliding", False) else None for layer in probe.layers]


def decoder_layers(model) -> torch.nn.ModuleList:
    try:
        layers = model.get_decoder().layers
    except (AttributeError, ValueError):
        layers = None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise LookaheadKVError(f"{type(model).__name__}: cannot find its decoder layers (model.get_decoder().layers)")
    return layers


def _linear_children(module: torch.nn.Module) -> list[str]:
    return [name for name, child in module.named_children() if isinstance(child, torch.nn.Linear)]


def _is_dense_mlp(mlp: torch.nn.Module) -> bool:
    """A dense MLP has only linear layers and an activation. An MoE block routes flattened tokens to experts
    (often 3-D parameters, not linear layers), where the lookahead rows cannot be told apart by position."""
    children = list(mlp.named_children())
    return bool(children) and all(isinstance(c, torch.nn.Linear) or not list(c.parameters()) for _, c in children)


def lora_targets(model) -> tuple[str, ...]:
    """The lookahead LoRA's target modules, from the first decoder layer: every linear layer of its attention
    (q/k/v/o, or the fused qkv_proj of Phi-3) and of its MLP when the MLP is dense (gate/up/down, or the fused
    gate_up_proj). An MoE MLP gets none. No attention projection found is an error."""
    layer = decoder_layers(model)[0]
    attn = getattr(layer, "self_attn", None)
    names = _linear_children(attn) if attn is not None else []
    if not names:
        raise LookaheadKVError(f"{type(model).__name__}: no linear attention projections found under "
                               "self_attn for the lookahead LoRA")
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and _is_dense_mlp(mlp):
        names += _linear_children(mlp)
    return tuple(names)


def lora_pattern(model, targets: tuple[str, ...]) -> str:
    """A regular expression (PEFT's full-match form) for `targets` inside the decoder layers only, so the
    LoRA never lands on a vision tower's modules of the same name."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    parts = {"self_attn": _linear_children(layers[0].self_attn),
             "mlp": _linear_children(getattr(layers[0], "mlp", torch.nn.Module()))}
    blocks = [f"{block}\\.({'|'.join(sorted(set(names) & set(targets)))})"
              for block, names in parts.items() if set(names) & set(targets)]
    missing = set(targets) - {n for names in parts.values() for n in names}
    if missing:
        raise LookaheadKVError(f"{type(model).__name__} has no {', '.join(sorted(missing))} in its decoder layers "
                               "for the lookahead LoRA; a module for another architecture does not fit it")
    return rf"{re.escape(prefix)}\.\d+\.({'|'.join(blocks)})"


def unsupported(model) -> str | None:
    """Why eviction cannot serve this model exactly, in a few words; None when it can."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (decoder-only models are)"
    for t in layer_types(cfg):
        if t not in SUPPORTED_LAYER_TYPES:
            return f"it has {t} layers ({_WHY.get(t, 'not a plain or sliding-window attention layer')})"
    if not getattr(model, "_supports_attention_backend", False):
        return "its attention does not go through transformers' attention-function registry"
    try:
        decoder_layers(model)
    except LookaheadKVError as e:
        return str(e).split(": ", 1)[-1]
    return None


def check(model) -> None:
    """Refuse, with one line naming what is missing, a model that eviction cannot serve exactly."""
    why = unsupported(model)
    if why is not None:
        name = getattr(text_config(model.config), "model_type", None) or type(model).__name__
        raise LookaheadKVError(f"{name} ({type(model).__name__}) is not supported: {why}")
