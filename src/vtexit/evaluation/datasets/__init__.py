"""Datasets used by the project (read from files shipped in PyPI packages; no downloads)."""

from vtexit.evaluation.datasets.easy_vqa import ANSWER_TYPES, EasyVQA, VQARecord, answer_type

__all__ = ["ANSWER_TYPES", "EasyVQA", "VQARecord", "answer_type"]
