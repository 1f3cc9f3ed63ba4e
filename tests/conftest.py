import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lookaheadkv.attention import install


def tiny_model(layers: int = 3, kv_heads: int = 2, heads: int = 4, vocab: int = 128, seed: int = 0):
    """A random-weight Llama in float64 (no near-ties in greedy decoding), with our attention installed. The tiny
    models share one tokenizer identity (ids 0..vocab-1), so one may draft for another (SpecKV)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    model = install(LlamaForCausalLM(cfg).double().eval())
    model.tokenizer_sha256 = f"tiny: ids 0-{vocab - 1}"
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a left-padded batch (pad id 0)."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return ids, mask


def save_tiny(path, seed, prefix="t", layers=3, merges=None):
    """A tiny model directory with a word-level tokenizer ("t0".."t127"), loadable by load_model and the CLI;
    with `merges`, a BPE tokenizer of one fixed vocabulary (letters and the pairs they merge into) instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if merges is None:
        tok = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(128)}, unk_token=f"{prefix}0"))
    else:
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        pairs = [a + b for a in letters[:10] for b in letters[:10]]
        vocab = {t: i for i, t in enumerate([f"{prefix}0", f"{prefix}2"] + letters + pairs)}  # 128 tokens
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=f"{prefix}0", eos_token=f"{prefix}2",
                                   pad_token=f"{prefix}0")
    model = tiny_model(layers=layers, seed=seed).float()
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def tiny_tokenizer(vocab: int = 128):
    """A word-level tokenizer for the tiny models: ids 0-3 are <pad> <s> </s> <unk>, id i >= 4 the word "w{i}",
    with a minimal chat template, so pipelines, streamers and chat messages run without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    tok.chat_template = "{% for m in messages %}w4 {{ m['content'] }} w5 {% endfor %}w6"
    return tok
