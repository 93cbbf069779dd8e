"""vtexit's pre-LLM methods (pool, divprune, visionzip) inside vLLM, as an out-of-tree plugin: LLaVA-1.5-style
models with a CLIP, SigLIP or DINOv2 tower (DINOv2, as vtexit's default model has, is a tower vLLM's own LLaVA
does not build; ``{"method": "none"}`` serves such a model unreduced), and Qwen2-VL / Qwen2.5-VL (on images:
:mod:`vtexit.integrations.vllm.qwen`).

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point in every process. It registers the model
classes ``VtexitLlavaForConditionalGeneration``, ``VtexitQwen2_5_VLForConditionalGeneration`` and
``VtexitQwen2VLForConditionalGeneration``, which a model picks per engine with ``hf_overrides={"architectures":
["VtexitLlavaForConditionalGeneration"], "vtexit": {"method": "pool", "stride": 2}}``. Importing this package does
not import vLLM; :func:`register` does.
"""

from __future__ import annotations

ARCHITECTURE = "VtexitLlavaForConditionalGeneration"
QWEN_ARCHITECTURES = ("VtexitQwen2_5_VLForConditionalGeneration", "VtexitQwen2VLForConditionalGeneration")


def register() -> None:
    """Register vtexit's model classes with vLLM's model registry (lazily: a class is imported when a model uses
    it). Warns once when the installed vLLM is outside the tested releases."""
    from vtexit.integrations.vllm import compat

    compat.warn_if_untested()
    compat.register_model(ARCHITECTURE, "vtexit.integrations.vllm.model:VtexitLlavaForConditionalGeneration")
    for architecture in QWEN_ARCHITECTURES:
        compat.register_model(architecture, f"vtexit.integrations.vllm.qwen:{architecture}")


__all__ = ["ARCHITECTURE", "QWEN_ARCHITECTURES", "register"]
