"""Long-form fidelity: summaries and extractions over essays (TEST split), with no gold answer. Each method's
output is scored by ROUGE-L against the full-cache output of the same model on the same prompt."""

from __future__ import annotations

import random

from .ruler import essay_sentences, essay_window
from .tasks import Parts, Task, register


def _essay_task(instruction: str):
    def build(rng: random.Random, size: int) -> Parts:
        sents = essay_window(rng, min(size, len(essay_sentences())))
        return Parts(f"Read the following text.\n\n{' '.join(sents)}", f"\n\n{instruction}", [])

    return build


register(Task("essay_summary", "fidelity", "rouge", 96,
              _essay_task("Summarize the text above in five sentences."), 1 / 28))
register(Task("essay_extract", "fidelity", "rouge", 96,
              _essay_task("List every person, company, place and number that the text above mentions, one per "
                          "line."), 1 / 28))
