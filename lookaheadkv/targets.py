"""The target store: training targets on disk, keyed by each prompt's content hash.

A folder holds `manifest.json` (the model's identity and the response cap the targets were made with: a folder
serves one of each, anything else is refused) and shards `shard-<hash>.safetensors`, each written once,
atomically, by one collection batch. A shard holds, per prompt key, `<key>.ids`, `<key>.response` and
`<key>.truth` (fp16: measured equal to fp32 in the loss, results/train/), or only `<key>.ids` where the model
answered nothing (so that prompt is not collected again). Because targets are found by content, a run with
another batch size, prompt order or subset reuses exactly the targets it shares with an earlier one, and
processes reading the same folder (ablations, several ranks) share one copy through the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import distributed
from .collect import Target
from .errors import LookaheadKVError

FORMAT = 2  # 1: shards by batch index (train.py before the content-hash store), refused
TRUTH_DTYPE = torch.float16


class TargetStore:
    def __init__(self, path: str | Path, identity: dict, response_tokens: int):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "config_sha256": identity["config_sha256"],
                    "weights_sha256": identity["weights_sha256"], "response_tokens": response_tokens}
        mpath = self.path / "manifest.json"
        if mpath.exists():
            have = json.loads(mpath.read_text())
            if {k: have.get(k) for k in manifest} != manifest:
                what = ("an older target format" if have.get("format") != FORMAT else
                        f"a response cap of {have.get('response_tokens')}"
                        if have.get("response_tokens") != response_tokens else "another model")
                raise LookaheadKVError(f"{self.path} holds targets made with {what}; give another --targets "
                                       "folder or delete it")
        else:
            tmp = mpath.with_suffix(f".{os.getpid()}.tmp")  # one temporary file per process: no two write one
            tmp.write_text(json.dumps({**manifest, "model": identity.get("name", "")}, indent=1) + "\n")
            tmp.rename(mpath)
        self._index: dict[str, Path] = {}
        self._answered: set[str] = set()
        self._open: dict[Path, object] = {}
        self._shards: set[Path] = set()  # the shards indexed
        self.reload()

    def reload(self) -> None:
        """Index the shards on disk again (those other processes wrote since)."""
        for shard in sorted(self.path.glob("shard-*.safetensors")):
            if shard in self._shards:
                continue
            self._shards.add(shard)
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(".ids"):
                        self._index[name[:-4]] = shard
                    elif name.endswith(".truth"):
                        self._answered.add(name[:-6])

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def answered(self, key: str) -> bool:
        """Whether the store holds a target for this prompt (not just the note that the model answered nothing)."""
        return key in self._answered

    def get(self, key: str) -> Target | None:
        """The stored target (truth in fp16), or None where the model answered nothing."""
        shard = self._index[key]
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = safe_open(str(shard), framework="pt")
        if f"{key}.truth" not in f.keys():
            return None
        return Target(f.get_tensor(f"{key}.ids"), f.get_tensor(f"{key}.response"), f.get_tensor(f"{key}.truth"))

    def log_collection(self, stats: dict) -> None:
        """Add one collection run's figures (prompts, seconds, hardware) to `collection.json`: what the store cost,
        stated by the modules trained on it even when another process (`lookaheadkv targets`) collected."""
        runs = self.collection_runs()
        runs.append({**stats, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        tmp = self.path / "collection.json.tmp"
        tmp.write_text(json.dumps(runs, indent=1) + "\n")
        tmp.rename(self.path / "collection.json")

    def collection_runs(self) -> list[dict]:
        path = self.path / "collection.json"
        return json.loads(path.read_text()) if path.exists() else []

    def collection_cost(self) -> dict:
        """Seconds, prompts and hardware of every collection run that filled this store."""
        runs = self.collection_runs()
        return {"runs": len(runs), "seconds": round(sum(r.get("seconds", 0.0) for r in runs), 3),
                "prompts": sum(r.get("prompts", 0) for r in runs),
                "answered": sum(r.get("answered", 0) for r in runs),
                "hardware": sorted({r["hardware"] for r in runs if r.get("hardware")})}

    def put(self, targets: Iterable[tuple[str, torch.Tensor, Target | None]]) -> None:
        """Write one shard of (key, prompt ids, target or None) atomically: it is there whole or not at all."""
        tensors: dict[str, torch.Tensor] = {}
        for key, ids, t in targets:
            tensors[f"{key}.ids"] = ids.to(torch.int64).contiguous()
            if t is not None:
                tensors[f"{key}.response"] = t.response.to(torch.int64).contiguous()
                tensors[f"{key}.truth"] = t.truth.to(TRUTH_DTYPE).contiguous()
        if not tensors:
            return
        keys = sorted(k[:-4] for k in tensors if k.endswith(".ids"))
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        shard = self.path / f"shard-{name}.safetensors"
        tmp = shard.with_suffix(f".{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        tmp.rename(shard)
        self._shards.add(shard)
        for k in keys:
            self._index[k] = shard
        self._answered |= {k[:-6] for k in tensors if k.endswith(".truth")}


def open_store(path: str | Path, identity: dict, response_tokens: int) -> TargetStore:
    """The store at `path` for this process. Under torchrun rank 0 opens it first (it alone writes the manifest),
    the others after it; the shards they write later are named by content, so no two ranks write one file."""
    store = TargetStore(path, identity, response_tokens) if distributed.is_main() else None
    distributed.barrier()
    return TargetStore(path, identity, response_tokens) if store is None else store
