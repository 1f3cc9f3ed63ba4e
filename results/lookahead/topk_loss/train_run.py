"""`lookaheadkv train` through the Python API with a validation share of 0.2, on the prompts already in the store."""
import sys

import torch

from lookaheadkv import lookahead as la
from lookaheadkv.collect import prompt_key
from lookaheadkv.models import load_model
from lookaheadkv.targets import open_store
from lookaheadkv.train import TrainConfig, train
from lookaheadkv.train_data import load_prompts

out, weight, lr, epochs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
ids, fams, options = load_prompts("/tmp/tk/prompts.safetensors")
model, tok = load_model("smollm2-135m-instruct", device="cpu")
store = open_store("/tmp/tk/targets", la.model_identity(model), 96)
have = [i for i, x in enumerate(ids) if store.answered(prompt_key(torch.as_tensor(x)))]
print(f"{len(have)} prompts with targets", flush=True)
cfg = TrainConfig(samples=len(have), min_tokens=1, max_tokens=100000, response_tokens=96, epochs=epochs, batch_size=8,
                  lr=lr, val_share=0.2, evals=1, init="shipped", topk_weight=weight, topk=64)
train(model, tok, out, cfg, prompt_ids=[torch.as_tensor(ids[i]) for i in have], families=[fams[i] for i in have],
      targets_dir="/tmp/tk/targets", prompt_options=options)
