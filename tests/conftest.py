import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lookaheadkv.attention import install


def tiny_model(layers: int = 3, kv_heads: int = 2, heads: int = 4, vocab: int = 128, seed: int = 0):
    """A random-weight Llama in float64 (no near-ties in greedy decoding), with our attention installed."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    return install(LlamaForCausalLM(cfg).double().eval())


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
