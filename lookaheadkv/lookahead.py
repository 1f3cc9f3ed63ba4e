"""LookaheadKV: n learned embeddings run after the prompt with a LoRA active only on their rows.

Their attention onto the prompt's keys stands in for the attention of the answer the model has not written
yet, and scores the prompt for eviction like any other glimpse (mean over the n rows, then the shared
scoring core). Because the LoRA never touches a prompt row and attention is causal, the prompt's KV is
exactly the base model's, so the rows can run in two equivalent ways:

- single pass (inference default): the n rows ride at the end of the prompt's own prefill; PEFT's adapter
  stays off and a hook on each LoRA layer adds B(A(x)) to those n rows only, computed on them alone, so
  the prompt rows are the base model's bit for bit and the adapter costs n rows, not the prompt's length
  (running PEFT on every row and masking cost 45% of TTFT at 32K on an H200: results/bench). The
  lookahead entries are cropped from the cache afterwards.
- two passes: plain prefill (any kernel, chunked), then one n-row pass over the cached prompt with the LoRA on.

A module is a standard PEFT LoRA adapter directory plus `lookahead_embeddings.safetensors` and
`lookahead.json` (the base model's identity, n, how it was trained). The LoRA is injected into the model
once, under the adapter name "lookahead", and stays switched off outside the lookahead rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .architectures import lora_pattern, lora_targets, n_layers
from .attention import Recording, forward_state
from .cache import crop
from .errors import LookaheadKVError
from .methods import Method, register
from .prefill import ExtraRows, Prefill, forward

ADAPTER = "lookahead"
# The Llama family's targets (the shipped module's); a new module takes its model's own (architectures.lora_targets)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_DIR = Path(__file__).parent / "modules"
EMBEDDINGS_FILE = "lookahead_embeddings.safetensors"
META_FILE = "lookahead.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FORMAT = 1

@dataclass
class LookaheadModule:
    """The trainable parts: n embeddings (fp32 parameter) and the LoRA living inside the model."""

    embeddings: torch.nn.Parameter  # [n, hidden]
    rank: int
    alpha: int
    targets: tuple[str, ...]
    meta: dict = field(default_factory=dict)  # contents of lookahead.json
    path: Path | None = None

    @property
    def n(self) -> int:
        return self.embeddings.shape[0]

    def parameters(self, model) -> list[torch.nn.Parameter]:
        """Everything that trains: the embeddings and the LoRA's A and B matrices."""
        return [self.embeddings] + [p for name, p in model.named_parameters() if f".{ADAPTER}." in name]


# ---------------------------------------------------------------------------------------------- identity

_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings",
                  "tie_word_embeddings", "rms_norm_eps")
_SAMPLE = 4096  # elements hashed per tensor, evenly spread over it: every tensor counts, the whole stays cheap


def _base_parameters(model) -> dict[str, torch.Tensor]:
    """The base model's parameters under their plain names (PEFT's wrappers and LoRA left out)."""
    return {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}


def model_identity(model) -> dict:
    """Name, sha256 of the architecture's config fields, and sha256 of every base tensor's name, shape and
    `_SAMPLE` evenly spaced elements (so a fine-tune of any one tensor changes it). The elements are gathered on
    the model's device, copied to the CPU once and rounded there to bf16 through fp32 (exact steps before the
    one rounding), so the same weights loaded in fp32 or bf16, on CPU or GPU, hash alike."""
    cfg = model.config.to_dict()
    arch = {k: cfg.get(k) for k in _CONFIG_FIELDS}
    params = _base_parameters(model)
    names = sorted(params)
    samples = []
    for name in names:
        t = params[name].detach().flatten()
        k = min(_SAMPLE, t.numel())
        samples.append(t[torch.arange(k, device=t.device) * t.numel() // k].float())
    values = torch.cat(samples).cpu().to(torch.bfloat16).view(torch.int16).numpy()
    h = hashlib.sha256()
    start = 0
    for name, s in zip(names, samples):
        h.update(f"{name}{tuple(params[name].shape)}".encode())
        h.update(values[start:start + len(s)].tobytes())
        start += len(s)
    return {"name": str(getattr(model, "name_or_path", "")),
            "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": h.hexdigest(), "hashed_tensors": len(names)}


def _matches(meta: dict, ident: dict) -> bool:
    base = meta.get("base_model", {})
    return base.get("config_sha256") == ident["config_sha256"] and base.get("weights_sha256") == ident["weights_sha256"]


# ---------------------------------------------------------------------------------------------- LoRA rows


def _lora_layers(model) -> list:
    """The model's lookahead LoRA layers, found once at injection (a scan of a 8B model's ~2.7K modules costs
    milliseconds, and the single pass asks for them every prefill); none before a module is injected."""
    return model.__dict__.get("_lookahead_layers", [])


def _lora_params(layers: list) -> list[torch.nn.Parameter]:
    return [p for layer in layers for d in (layer.lora_A, layer.lora_B) for p in d[ADAPTER].parameters()]


def lora_groups(model) -> list[list]:
    """The lookahead LoRA layers in groups that read one input (see _sibling_groups), as found at injection."""
    return model.__dict__.get("_lookahead_groups", [])


def _sibling_groups(model, layers: list) -> list[list]:
    """The LoRA layers grouped by the input they read: siblings under one parent with the same input width (q/k/v
    of an attention block; gate/up of an MLP), in module order. A block's last projection (o_proj, down_proj)
    reads the block's inner result, not its input, so it stands alone even where its width matches."""
    wanted = {id(layer) for layer in layers}
    groups: list[list] = []
    for _, module in model.named_modules():
        mine = [child for child in module.children() if id(child) in wanted]
        if not mine:
            continue
        by_width: dict[int, list] = {}
        for child in mine[:-1]:
            by_width.setdefault(child.get_base_layer().in_features, []).append(child)
        groups += list(by_width.values()) + [[mine[-1]]]
    return groups


def _inject(model, rank: int, alpha: int, targets: tuple[str, ...]) -> None:
    """Add the lookahead LoRA to the model once (switched off); a second module must share its shape."""
    from peft import LoraConfig, inject_adapter_in_model

    have = getattr(model, "_lookahead_lora", None)
    if have is not None:
        if have != (rank, alpha, tuple(targets)):
            raise LookaheadKVError(
                f"this model already carries a lookahead LoRA of rank/alpha/targets {have}; load the model again "
                f"to use a module with {(rank, alpha, tuple(targets))}")
        return
    if rank == 0:  # lookahead tokens alone (the ablation without a LoRA)
        model._lookahead_lora, model._lookahead_config = (0, alpha, tuple(targets)), None
        _remember(model, [])
        return
    # Only inside the decoder layers (a vision tower's q_proj is no target), every target must exist there
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_pattern(model, tuple(targets)), lora_dropout=0.0,
                     bias="none")
    try:
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise LookaheadKVError(f"cannot add the lookahead LoRA to this model: {str(e).splitlines()[0]}") from None
    # The LoRA computes and trains in fp32 whatever the model's dtype (fp64 for a float64 model: the tests')
    dtype = torch.float64 if model.get_input_embeddings().weight.dtype == torch.float64 else torch.float32
    for name, p in model.named_parameters():
        if f".{ADAPTER}." in name:
            p.data = p.data.to(dtype)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    for layer in layers:
        layer.enable_adapters(False)
    model._lookahead_lora = (rank, alpha, tuple(targets))
    model._lookahead_config = cfg
    _remember(model, layers)


def _remember(model, layers: list) -> None:
    """The LoRA layers, their sibling groups and parameters, kept in the instance dict (not as submodules: lists
    of modules the model already owns) so that no later call walks the model's modules again."""
    model.__dict__["_lookahead_layers"] = layers
    model.__dict__["_lookahead_groups"] = _sibling_groups(model, layers)
    model.__dict__["_lookahead_params"] = _lora_params(layers)


@contextlib.contextmanager
def lora_rows(model, first_row: int = 0) -> Iterator[None]:
    """Switch the lookahead LoRA on for rows >= first_row of each forward, off again after.

    first_row 0 (the two-pass form, training): PEFT's own adapter path on every row of the forward.
    first_row > 0 (the single pass): the adapter stays off; a hook adds the LoRA delta, computed on the
    rows >= first_row alone, to those rows (fp32 delta added to the base output and rounded once, as PEFT).
    """
    layers = _lora_layers(model)
    if first_row > 0:
        rows = RowsLoRA.of(model, first_row)
        handles = [layer.register_forward_hook(rows.hook) for layer in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        return
    # PEFT's enable_adapters also flips requires_grad; keep whatever the caller (the trainer) set.
    flags = [(p, p.requires_grad) for p in _lora_params(layers)]
    for layer in layers:
        layer.enable_adapters(True)
    for p, f in flags:
        p.requires_grad_(f)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(False)
        for p, f in flags:
            p.requires_grad_(f)


class RowsLoRA:
    """The single pass's LoRA, on the rows >= first alone, in few launches: sibling LoRA layers that read one
    input (q/k/v of an attention block; gate/up of an MLP) share one product with their A matrices stacked and
    one with their B matrices (scaled) as a block diagonal; each member then adds its slice in place (the fp32
    delta added to the base output and rounded once, as PEFT does: bf16 products moved the kept sets of a real
    prompt). Per decoder layer that is ~19 launches instead of ~56 for one hook per projection. The groups are
    found once, at injection, and the stacked weights rebuilt only when a LoRA weight changes (training,
    loading): entering the single pass costs no scan of the model. A member whose input turns out not to be
    its group's (another architecture) computes its own."""

    def __init__(self, groups: list[list]):
        self.first = 0
        self.member: dict[int, tuple[int, int, list]] = {}  # id(layer) -> (its group's key, its index, the group)
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor, list[int]]] = {}  # key -> (A^T, B block^T, sizes)
        for members in groups:
            key = id(members[0])
            a = torch.cat([m.lora_A[ADAPTER].weight for m in members])  # [sum r, in]
            b = torch.block_diag(*[m.lora_B[ADAPTER].weight * m.scaling[ADAPTER] for m in members])  # [sum out, sum r]
            sizes = [m.lora_B[ADAPTER].weight.shape[0] for m in members]
            self.weights[key] = (a.T.contiguous(), b.T.contiguous(), sizes)
            for i, m in enumerate(members):
                self.member[id(m)] = (key, i, members)
        self.inputs: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # key -> (its input, the deltas)

    @staticmethod
    def of(model, first: int) -> RowsLoRA:
        params = model.__dict__.get("_lookahead_params", [])
        version = tuple(p._version for p in params) + tuple(p.data_ptr() for p in params)
        cached = model.__dict__.get("_lookahead_rows")
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = (version, RowsLoRA(lora_groups(model)))
            model.__dict__["_lookahead_rows"] = cached
        rows = cached[1]
        rows.first, rows.inputs = first, {}
        return rows

    def hook(self, layer, args, output):
        x = args[0]
        if x.dim() != 3:  # e.g. an MoE expert's flattened tokens: rows cannot be found by position
            raise LookaheadKVError(f"the lookahead LoRA sits on a module fed {x.dim()}-D input, not "
                                   "[batch, rows, hidden]; its rows cannot be told apart")
        key, i, members = self.member[id(layer)]
        seen = self.inputs.get(key)
        if seen is None or seen[0] is not x:
            at, bt, sizes = self.weights[key]
            h = _rows(x, self.first).to(at.dtype) @ at
            if seen is not None or i > 0:  # this member's own input: only its own slice of the group counts
                lo = sum(m.lora_A[ADAPTER].weight.shape[0] for m in members[:i])
                r = members[i].lora_A[ADAPTER].weight.shape[0]
                delta = h[..., lo:lo + r] @ (members[i].lora_B[ADAPTER].weight * members[i].scaling[ADAPTER]).T
                _rows(output, self.first).add_(delta)
                return output
            seen = (x, (h @ bt).split(sizes, dim=-1))
            self.inputs[key] = seen
        _rows(output, self.first).add_(seen[1][i])
        return output


def _rows(t: torch.Tensor, first: int) -> torch.Tensor:
    """The rows >= first of [B, L, D]; for one sequence as a 2-D view, so products run as plain matrix products
    (a 3-D operand costs a batched product and its views: ~40% of the adapter's host operations)."""
    return t[0, first:] if t.shape[0] == 1 else t[:, first:]


# ---------------------------------------------------------------------------------------------- create/save/load


def create(model, n: int = 32, rank: int = 8, alpha: int = 32, targets: tuple[str, ...] | None = None,
           seed: int = 0) -> LookaheadModule:
    """A fresh module: the LoRA injected (B = 0, so it starts as the identity) on `targets` (default: the
    model's own, architectures.lora_targets) and n embeddings initialised as copies of random vocabulary
    embeddings (realistic norms)."""
    targets = lora_targets(model) if targets is None else tuple(targets)
    _inject(model, rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    table = model.get_input_embeddings().weight.detach()
    rows = torch.randint(0, table.shape[0], (n,), generator=g).to(table.device)
    emb = torch.nn.Parameter(table[rows].float().clone())
    mod = LookaheadModule(emb, rank, alpha, tuple(targets), {"base_model": model_identity(model), "n": n})
    model._lookahead_module = mod
    return mod


def save(model, mod: LookaheadModule, out: str | Path, training: dict | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write the module: PEFT adapter files (none for rank 0) + embeddings + lookahead.json, tensors in `dtype`
    (None: as they are, fp32, so a checkpoint resumes exactly; the shipped modules: bf16 where that measures
    equal in recall)."""
    from peft import get_peft_model_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if mod.rank > 0:
        model._lookahead_config.save_pretrained(str(out))
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
        save_file({k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in state.items()},
                  str(out / ADAPTER_FILES[1]))
    emb = mod.embeddings.detach()
    save_file({"embeddings": emb.to(dtype or emb.dtype).cpu().contiguous()}, str(out / EMBEDDINGS_FILE))
    meta = dict(mod.meta, format=FORMAT, n=mod.n, rank=mod.rank, alpha=mod.alpha, targets=list(mod.targets),
                base_model=model_identity(model), dtype=str(dtype or emb.dtype).removeprefix("torch."))
    if training is not None:
        meta["training"] = training
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    mod.meta, mod.path = meta, out
    return out


def _read_meta(path: Path) -> dict:
    def missing(files):
        return [f for f in files if not (path / f).is_file()]

    if missing((META_FILE, EMBEDDINGS_FILE)):
        raise LookaheadKVError(f"{path} is not a lookahead module (missing "
                               f"{', '.join(missing((META_FILE, EMBEDDINGS_FILE, *ADAPTER_FILES)))}); "
                               "train one with `lookaheadkv train`")
    try:
        meta = json.loads((path / META_FILE).read_text())
        _ = meta["base_model"]["config_sha256"], meta["n"], meta["rank"], meta["alpha"], meta["targets"]
    except (ValueError, KeyError, TypeError) as e:
        raise LookaheadKVError(f"{path / META_FILE} is damaged ({type(e).__name__}: {e}); "
                               "train the module again") from None
    if meta["rank"] > 0 and missing(ADAPTER_FILES):
        raise LookaheadKVError(f"{path} is not a lookahead module (missing {', '.join(missing(ADAPTER_FILES))}); "
                               "train one with `lookaheadkv train`")
    return meta


def load(model, path: str | Path) -> LookaheadModule:
    """Load a module for `model`; refused (LookaheadKVError) if it was made for another model or is damaged."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    if not path.is_dir():
        raise LookaheadKVError(f"lookahead module {path} does not exist")
    meta = _read_meta(path)
    ident = model_identity(model)
    if not _matches(meta, ident):
        base = meta["base_model"]
        what = "architecture" if base.get("config_sha256") != ident["config_sha256"] else "weights"
        raise LookaheadKVError(
            f"lookahead module {path} was trained for {base.get('name') or 'another model'!r}, not this model "
            f"({ident['name'] or 'unnamed'}: its {what} differ); train one for it with "
            "`lookaheadkv train --model M --out DIR`")
    try:
        emb = load_file(str(path / EMBEDDINGS_FILE))["embeddings"].float()
        lora = load_file(str(path / ADAPTER_FILES[1])) if meta["rank"] > 0 else {}
    except Exception as e:  # safetensors raises several types on a truncated or garbled file
        raise LookaheadKVError(f"lookahead module {path} is damaged ({str(e).splitlines()[0]}); "
                               "fetch or train it again") from None
    hidden = model.get_input_embeddings().weight.shape[1]
    if emb.ndim != 2 or emb.shape != (meta["n"], hidden):
        raise LookaheadKVError(f"lookahead module {path}: embeddings of shape {tuple(emb.shape)}, expected "
                               f"({meta['n']}, {hidden}); the file is damaged")
    _inject(model, meta["rank"], meta["alpha"], tuple(meta["targets"]))
    device = model.get_input_embeddings().weight.device
    if meta["rank"] > 0:
        result = set_peft_model_state_dict(model, {k: v.to(device) for k, v in lora.items()}, adapter_name=ADAPTER)
        lora_missing = [k for k in result.missing_keys if f".{ADAPTER}." in k]
        if result.unexpected_keys or lora_missing or not lora:
            raise LookaheadKVError(f"lookahead module {path}: adapter weights do not fit this model "
                                   f"({len(lora_missing)} missing, {len(result.unexpected_keys)} unexpected)")
    mod = LookaheadModule(torch.nn.Parameter(emb.to(device), requires_grad=False), meta["rank"], meta["alpha"],
                          tuple(meta["targets"]), meta, path)
    model._lookahead_module = mod
    return mod


def shipped_module(model) -> Path:
    """The module shipped with the package for this model (matched by identity, not by name)."""
    ident = model_identity(model)
    for d in sorted(MODULES_DIR.glob("*/")):
        try:
            if _matches(json.loads((d / META_FILE).read_text()), ident):
                return d
        except (OSError, ValueError):
            continue
    raise LookaheadKVError(f"no lookahead module is shipped for {ident['name'] or 'this model'}; train one with "
                           "`lookaheadkv train --model M --out DIR` and pass it with --module DIR")


def use_module(model, path: str | Path | None = None) -> LookaheadModule:
    """The module attached to `model`, loading `path` (or the shipped one) the first time it is asked for."""
    mod = getattr(model, "_lookahead_module", None)
    if path is None and mod is not None:
        return mod
    path = Path(path) if path is not None else shipped_module(model)
    if mod is not None and mod.path is not None and mod.path.resolve() == path.resolve():
        return mod
    return load(model, path)


# ---------------------------------------------------------------------------------------------- the lookahead rows


def lookahead_embeds(model, mod: LookaheadModule, batch: int) -> torch.Tensor:
    """The n embeddings as the model's input rows. They live in the embedding table's space (initialised from
    its rows), so a model that scales its token embeddings (Gemma: by sqrt(hidden)) scales them alike."""
    table = model.get_input_embeddings()
    emb = mod.embeddings
    scale = getattr(table, "embed_scale", None)
    if scale is not None:
        emb = emb * torch.as_tensor(scale, dtype=emb.dtype, device=emb.device)
    return emb.to(table.weight.dtype)[None].expand(batch, -1, -1)


def extra_rows(model, mod: LookaheadModule, batch: int) -> ExtraRows:
    """The single-pass form: rows appended in the prompt's prefill, the LoRA on those rows only."""
    return ExtraRows(lookahead_embeds(model, mod, batch), lambda first: lora_rows(model, first))


def lookahead_pass(model, mod: LookaheadModule, pf: Prefill, grad: bool = False) -> Recording:
    """The two-pass form: the n rows after the cached prompt at their true positions, LoRA on; records
    their attention onto the prompt's keys (keeping the graph when grad), then crops them from the cache."""
    batch = pf.input_ids.shape[0]
    rec = Recording(rows=-1, columns=pf.length, grad=grad)
    positions = pf.lengths[:, None] + torch.arange(mod.n, device=pf.valid.device)
    with torch.set_grad_enabled(grad), lora_rows(model, 0), \
            forward_state(rec, pf.key_valid(n_layers(model))):
        forward(model, pf.cache, positions, inputs_embeds=lookahead_embeds(model, mod, batch))
    crop(pf.cache, pf.length)
    return rec


@register
@dataclass
class Lookahead(Method):
    """LookaheadKV. Defaults: no pooling, no forced recent window: the best of 15 pooling/window settings by
    importance recall on held-out train-split prompts (results/lookahead/grid.md; pooling smears the sharp
    lookahead scores and costs 0.25-0.35 recall)."""

    name = "lookahead"
    summary = "LookaheadKV: 32 learned embeddings + a LoRA active only on them glimpse the answer (trained module)"
    module: str | None = None  # module directory; None: the one shipped for this model
    passes: int = 1  # 1: rows ride in the prompt's prefill; 2: plain prefill, then the n-row pass
    window: int = 0
    keep_window: bool = False
    pooling: str = "none"
    kernel: int = 1

    def prefill_extra(self, model) -> ExtraRows | None:
        if self.passes not in (1, 2):
            raise LookaheadKVError(f"passes must be 1 or 2, got {self.passes}")
        return None if self.passes == 2 else extra_rows(model, use_module(model, self.module), 1)

    def glimpse(self, model, pf: Prefill) -> list[torch.Tensor]:
        if pf.extra is not None:
            return pf.extra.mean()
        return lookahead_pass(model, use_module(model, self.module), pf).mean()
