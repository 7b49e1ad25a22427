"""VLM judge: a vision-language model is asked a yes/no question about each sample (is the
caption right, is the image worth training on) and the sample's score `vlm` is P(yes), read
from the logits of the next token; nothing is generated. Keye-VL uses such VLM
discriminators beside CLIP scores when it cleans pre-training data.

P(yes) is normalised over the answer words: softmax over the logits of the first tokens of
`yes_words` and `no_words` (logsumexp within each group), so it is comparable across models
whose vocabularies spell "Yes" differently. `threshold` drops samples below it.
"""

from __future__ import annotations

from typing import Any

from reelforge.curation.schema import drop, set_score
from reelforge.curation.step import StepContext, register_step
from reelforge.curation.vlm import VLMStep
from reelforge.filters.clip_score import caption_of

DEFAULT_QUESTION = ("Here is a caption for the {media}: \"{text}\"\n"
                    "Is the caption an accurate description of the {media}, and is the {media} clear and "
                    "informative? Answer yes or no.")


@register_step("vlm_judge")
class VlmJudge(VLMStep):
    def __init__(self, model: str = "", question: str = DEFAULT_QUESTION, threshold: float | None = None,
                 yes_words: list | None = None, no_words: list | None = None,
                 conversation_text: str = "assistant", **kw: Any):
        super().__init__(model=model, **kw)
        if "{text}" not in question:
            raise ValueError("`question` must contain {text}, where the sample's caption goes")
        if threshold is not None and not 0 <= float(threshold) <= 1:
            raise ValueError("`threshold` is a probability: use a number between 0 and 1")
        self.question = question
        self.threshold = None if threshold is None else float(threshold)
        self.yes_words = list(yes_words or ["Yes", "yes"])
        self.no_words = list(no_words or ["No", "no"])
        self.conversation_text = conversation_text

    def setup(self, context: StepContext | None = None) -> None:
        super().setup(context)
        self._yes = self._model.answer_ids(self.yes_words)
        self._no = self._model.answer_ids(self.no_words)
        if set(self._yes) & set(self._no):
            raise ValueError("yes_words and no_words start with the same token for this tokenizer")

    def prompt_for(self, row: dict) -> tuple[str, str] | None:
        kinds = {m["kind"] for m in row.get("media") or []}
        if not kinds:
            return None
        media = "video" if kinds == {"video"} else "image"
        return "judge", self.question.format(text=caption_of(row, self.conversation_text), media=media)

    def run_model(self, inputs, tasks: list[str]) -> list:
        return [float(p) for p in self._model.yes_prob(inputs, self._yes, self._no)]

    def take(self, row: dict, task: str, prompt: str, result: float) -> None:
        set_score(row, "vlm", result)
        if self.threshold is not None and result < self.threshold:
            drop(row, self.name, "low_vlm_score", f"P(yes) {result:.4f} < {self.threshold}")
