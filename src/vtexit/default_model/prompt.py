"""The one prompt format of the default model, shared by training, ``load_default`` and evaluation.

SmolLM2's own chat template prepends a ~20-token default system prompt; we drop it to keep sequences short
(64 visual tokens already dominate the cost) and use the ChatML turn markers the LM was tuned on.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"

# Renders [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] exactly like
# build_prompt(q); string contents are also accepted. Multi-turn chats render one ChatML block per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_prompt(question: str) -> str:
    """Prompt for one image and one question; the answer is generated right after it."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question.strip()}{END_OF_TURN}\n<|im_start|>assistant\n"


def build_followup(question: str) -> str:
    """A further question about the same image, appended after a previous answer's end-of-turn."""
    return f"\n<|im_start|>user\n{question.strip()}{END_OF_TURN}\n<|im_start|>assistant\n"


def answer_text(answer: str) -> str:
    """Training target for one answer (the end-of-turn token teaches the model to stop)."""
    return f"{answer.strip()}{END_OF_TURN}"
