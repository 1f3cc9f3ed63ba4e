"""Answer metrics, as the field computes them.

- RULER string match: `string_match_all` (share of references found in the prediction, case-insensitive;
  needles, variable tracking, word extraction) and `string_match_part` (1 if any reference is found; QA).
- SQuAD / LongBench: `token_f1` and `exact_match` after their normalisation (lower case, punctuation
  deleted, so "1,000" is "1000", articles dropped, single spaces), the best over the references.
- ROUGE-L: F1 of the longest common subsequence of lower-cased word tokens.
- `mean_ci`: the mean and the half-width of its normal 95% interval.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of the references that occur in the prediction (RULER's niah/vt/cwe/fwe score)."""
    if not references:
        return 0.0
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference occurs in the prediction (RULER's QA score)."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


def normalize_answer(text: str) -> list[str]:
    """SQuAD normalisation, as words: punctuation is deleted, not made a word break."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def _f1(p: list[str], r: list[str]) -> float:
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """Word-level F1 after normalisation, the best over the references."""
    refs = [references] if isinstance(references, str) else list(references)
    p = normalize_answer(prediction)
    return max((_f1(p, normalize_answer(r)) for r in refs), default=0.0)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    refs = [references] if isinstance(references, str) else list(references)
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in refs))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words (1.0 when both are empty)."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (nan for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)
