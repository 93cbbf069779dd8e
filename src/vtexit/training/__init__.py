"""Tuning a model so that it tolerates a vtexit method: LoRA fine-tuning with the method active."""

from vtexit.training.lora import LoraSettings, add_lora, load_lora, lora_factors, merge_lora, save_lora
from vtexit.training.sampler import ConfigSampler, vtw_sampler
from vtexit.training.tune import TuneResult, tune

__all__ = [
    "ConfigSampler",
    "LoraSettings",
    "TuneResult",
    "add_lora",
    "load_lora",
    "lora_factors",
    "merge_lora",
    "save_lora",
    "tune",
    "vtw_sampler",
]
