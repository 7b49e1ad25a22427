"""Text tokens counted with the model's own tokenizer and chat template, light enough for
every Spark Python worker.

A transformers tokenizer folder (`tokenizer.json` + `tokenizer_config.json`, and
`chat_template.jinja` where transformers 5 writes it) is read with the `tokenizers`
library and the template rendered with jinja2's sandbox exactly as transformers does,
because importing transformers pulls torch (~0.5 GB) into each worker. A folder without
`tokenizer.json` (a slow tokenizer) falls back to `transformers.AutoTokenizer`.

Vision placeholders count as their frame tokens: `<image>` becomes
`<|vision_start|><|image_pad|><|vision_end|>` in the model's text, and the pads are the
visual tokens counted from sizes, so text tokens include the start/end markers only.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from reelforge.curation.schema import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

VISION_TEXT = "<|vision_start|><|vision_end|>"
KEYE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class TokenizerError(Exception):
    pass


def _vision_text(s: str) -> str:
    return s.replace(IMAGE_PLACEHOLDER, VISION_TEXT).replace(VIDEO_PLACEHOLDER, VISION_TEXT)


class TextTokenizer:
    """Counts tokens of text and of chat-rendered conversations."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise TokenizerError(f"tokenizer folder {path} does not exist")
        self.path = path
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        jinja_path = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            with open(jinja_path) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template = template or KEYE_CHAT_TEMPLATE
        self.has_own_template = template is not None
        self.special = {k: v for k, v in cfg.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in self.special.items()}
        tj = os.path.join(path, "tokenizer.json")
        if os.path.exists(tj):
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(tj)
            self._encode = lambda s: len(self._tok.encode(s, add_special_tokens=False).ids)
        else:  # a slow tokenizer: only transformers can read it
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path)
            self._encode = lambda s: len(hf(s, add_special_tokens=False)["input_ids"])
        self._render = self._compile(self.chat_template)

    def _compile(self, template: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str):
            raise TokenizerError(f"chat template refused the conversation: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)

    def count(self, text: str) -> int:
        return self._encode(_vision_text(text))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        msgs = [{"role": m["role"], "content": _vision_text(m["content"])} for m in messages]
        return self._render.render(messages=msgs, add_generation_prompt=add_generation_prompt, **self.special)

    def count_chat(self, messages: list[dict]) -> int:
        return self._encode(self.render_chat(messages))

    def sample_tokens(self, row: dict) -> int:
        """Text tokens of a sample as the trainer will see it.

        Conversations are rendered with the chat template; a preference pair counts both
        rendered sequences (prompt + chosen, prompt + rejected); captions count their
        vision markers plus the caption; documents their text.
        """
        kind = row.get("kind")
        msgs = row.get("messages")
        if kind == "preference":
            prompt = list(msgs or [])
            return sum(self.count_chat(prompt + [{"role": "assistant", "content": row.get(k) or ""}])
                       for k in ("chosen", "rejected"))
        if msgs:
            return self.count_chat(list(msgs))
        text = row.get("text") or ""
        if kind in ("image_text", "video_text"):
            tags = "".join(IMAGE_PLACEHOLDER if m["kind"] == "image" else VIDEO_PLACEHOLDER
                           for m in row.get("media") or [])
            text = tags + text
        return self.count(text)


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> TextTokenizer:
    """One tokenizer per worker process and path."""
    return TextTokenizer(path)
