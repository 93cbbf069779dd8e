"""easy-vqa conversations for training the default model: one image and 1..turns question/answer turns about it,
token ids built the way the processor builds them, labels on the answer tokens only (``-100`` elsewhere).

Shared by ``scripts/train_default_model.py`` (which trains the default weights) and ``scripts/tune_withdrawal.py``
(which tunes them to tolerate an early withdrawal).
"""

from __future__ import annotations

import random

import torch

from vtexit.default_model.assemble import NUM_IMAGE_TOKENS
from vtexit.default_model.prompt import IMAGE_TOKEN, answer_text, build_followup, build_prompt
from vtexit.evaluation.datasets.easy_vqa import VQARecord


def group_by_image(records: list[VQARecord]) -> dict[int, list[VQARecord]]:
    groups: dict[int, list[VQARecord]] = {}
    for r in records:
        groups.setdefault(r.image_id, []).append(r)
    return groups


class Encoder:
    """Token ids and answer-only labels for a conversation about one image."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.image = IMAGE_TOKEN * NUM_IMAGE_TOKENS
        self.memo: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.memo:
            self.memo[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.memo[text]

    def prompt_ids(self, question: str) -> list[int]:
        return self.ids(build_prompt(question).replace(IMAGE_TOKEN, self.image))

    def encode(self, turns: list[VQARecord]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for i, rec in enumerate(turns):
            prompt = self.prompt_ids(rec.question) if i == 0 else self.ids(build_followup(rec.question))
            target = self.ids(answer_text(rec.answer))
            ids += prompt + target
            labels += [-100] * len(prompt) + target
        return ids, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded batch of variable length (training has no generation, so right padding is fine)."""
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return ids, labels, mask


class Batches:
    """Seeded sampler: each sequence = one image, 1..turns of its questions in random order."""

    def __init__(self, groups: dict[int, list[VQARecord]], row_of: dict[int, int], turns: int, seed: int):
        self.groups, self.row_of, self.turns = groups, row_of, turns
        self.rng = random.Random(seed)
        self.queue: list[int] = []

    def next(self, size: int) -> tuple[list[int], list[list[VQARecord]]]:
        rows, convs = [], []
        for _ in range(size):
            if not self.queue:
                self.queue = list(self.groups)
                self.rng.shuffle(self.queue)
            image_id = self.queue.pop()
            questions = self.groups[image_id]
            k = self.rng.randint(1, min(self.turns, len(questions)))
            rows.append(self.row_of[image_id])
            convs.append(self.rng.sample(questions, k))
        return rows, convs
