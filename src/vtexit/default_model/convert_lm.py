"""GGUF -> plain transformers Llama: the SmolLM2-135M-Instruct language model and its tokenizer.

transformers de-quantizes a GGUF file on load (slow, ~15-40 s) and refuses to ``save_pretrained`` such a
model, so we rebuild a plain ``LlamaForCausalLM`` from its config (without ``quantization_config``), copy the
de-quantized float weights, and let the caller save that once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from vtexit.default_model.parts import lm_gguf_path, require_module

# Keys of a GGUF-loaded config that only describe where it came from, not the architecture.
_DROP_CONFIG_KEYS = ("quantization_config", "_model_name_or_path", "transformers_version", "dtype")


def load_gguf_tokenizer(gguf: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored inside the GGUF file (vocab, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    require_module("gguf")
    gguf = gguf or lm_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def load_gguf_lm(gguf: Path | None = None) -> LlamaForCausalLM:
    """A plain float32 ``LlamaForCausalLM`` holding the de-quantized GGUF weights (no quantization state)."""
    from transformers import AutoModelForCausalLM

    require_module("gguf")
    require_module("accelerate")
    gguf = gguf or lm_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config_dict = {k: v for k, v in quantized.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    config = LlamaConfig(**config_dict)
    plain = LlamaForCausalLM(config).to(torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in quantized.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # lm_head is tied to embed_tokens and may be absent from the GGUF state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()
