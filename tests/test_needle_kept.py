"""scripts/needle_kept.py: the needle's token span (its last occurrence in the context) and which of its tokens
each layer's KV head keeps."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import needle_kept  # noqa: E402


class Chars:
    """A tokenizer of one token per character, with offsets."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_the_needle_span_is_its_last_occurrence_and_a_missing_one_is_empty():
    text = "key ab1; key ab1 is: 42. asked: ab1?"
    cut = text.index("asked")
    value, key, missing = needle_kept.spans(Chars(), text[:cut], ["42", "ab1", "zz"])
    assert value == [21, 22] and key == [13, 14, 15] and missing == []


def test_held_marks_each_heads_kept_tokens_and_a_whole_layer_keeps_all():
    kept = [torch.tensor([[[1, 5, 9], [2, 3, 5]]]), None]  # layer 0: two KV heads; layer 1 keeps everything
    got = needle_kept.held(kept, [5, 9], n_kv=2)
    assert got.tolist() == [[True, True], [True, False], [True, True], [True, True]]
