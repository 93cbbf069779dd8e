"""VisionZip's scores on towers whose prompt tokens are groups of patches: InternViT (CLS token, 2x2 pixel shuffle),
SigLIP in Gemma3 (no CLS, average pooling) and in Idefics3 / SmolVLM (no CLS, pixel shuffle), and the Qwen2-VL,
Qwen2.5-VL and Qwen3-VL vision transformers (no CLS, 2x2 patch merger, windowed blocks in 2.5-VL).

A patch's score is the CLS token's attention to it (summed over heads) where the tower has a CLS token, else the
attention it receives from every token (mean over heads and queries); a prompt token's score is the sum over its
patches and its key the mean of their keys (mean over heads). Everything is recomputed from the scored block's input
(its norm, query/key projections and, in Qwen's towers, its rotary embedding), so the tower keeps its SDPA kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vtexit.core.vision_compat import (
    PIXEL_SHUFFLE,
    full_attention_blocks,
    pixel_shuffle,
    qwen_block_call,
    qwen_qkv,
    qwen_window_index,
)
from vtexit.methods.visionzip.selection import attention_received
from vtexit.methods.visionzip.tower import CLS_TOWERS, _attribute, _encoder_layers, _projection

VIT_FAMILIES = ("internvl", "gemma3", "idefics3")  # and LLaVA-1.5's layout with a tower without CLS token
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_NORMS = ("layernorm_before", "layer_norm1", "norm1")


@dataclass(frozen=True)
class ViTGroups:
    """A ViT tower whose output rows (images or tiles) each become ``groups.shape[0]`` prompt tokens."""

    model_type: str
    block: nn.Module  # the layer whose output the projector reads; its input is captured
    norm: nn.Module
    query: nn.Linear
    key: nn.Linear
    query_norm: nn.Module | None  # InternViT's optional q/k RMSNorm, over all heads at once
    key_norm: nn.Module | None
    heads: int
    cls: bool  # the tower's first token is a CLS token (not a prompt token)
    groups: torch.Tensor  # (prompt tokens, patches per token): each prompt token's patches, CLS not counted
    output: nn.Module  # the projector: its output (rows, prompt tokens, hidden) enters the prompt

    @property
    def tokens(self) -> int:
        return self.groups.shape[0]

    def scores_and_keys(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, tokens) each prompt token's score and (rows, tokens, head_dim) its key, from the block's input
        ``hidden`` (rows, [CLS +] patches, dim)."""
        x = self.norm(hidden)
        query, key = self.query(x), self.key(x)
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        rows, length, _ = key.shape
        query = query.view(rows, length, self.heads, -1).transpose(1, 2)
        key = key.view(rows, length, self.heads, -1).transpose(1, 2)  # (rows, heads, length, head_dim)
        if self.cls:
            scores = query[:, :, :1].float() @ key.float().transpose(2, 3) * key.shape[-1] ** -0.5
            patch_scores = scores.softmax(dim=-1).sum(dim=1)[:, 0, 1:]
            patch_keys = key[:, :, 1:].float().mean(dim=1)
        else:
            patch_scores = attention_received(query, key)
            patch_keys = key.float().mean(dim=1)
        if patch_scores.shape[1] != self.groups.numel():
            raise ValueError(
                f"visionzip expects {self.groups.numel()} patches per image from the {self.model_type} vision tower, "
                f"got {patch_scores.shape[1]}"
            )
        groups = self.groups.to(hidden.device)
        return patch_scores[:, groups].sum(dim=2), patch_keys[:, groups].mean(dim=2)


def find_vit_groups(model: nn.Module, family_name: str) -> ViTGroups:
    """The scored block and patch groups of an InternVL, Gemma3, Idefics3 / SmolVLM model, or (``family_name``
    "llava") of a LLaVA-style tower whose patches are each a token: SigLIP with ``vision_feature_select_strategy=
    "full"``, or each tile of LLaVA-NeXT / OneVision before packing."""
    config, core = model.config, model.model
    vision = config.vision_config
    model_type = config.model_type
    count = vision.num_hidden_layers
    layer, cls = -1, False
    if family_name in ("internvl", "llava"):
        layer = config.vision_feature_layer
        cls = family_name == "internvl" or vision.model_type in CLS_TOWERS
        strategy = "default" if cls else "full"  # the CLS token is not a prompt token; without one, every patch is
        if config.vision_feature_select_strategy != strategy:
            raise ValueError(
                f"visionzip needs vision_feature_select_strategy={strategy!r} on {model_type} with a "
                f"{vision.model_type} tower, got {config.vision_feature_select_strategy!r}"
            )
        if not isinstance(layer, int) or not -(count + 1) <= layer <= count or layer % (count + 1) == 0:
            raise ValueError(f"visionzip needs one vision_feature_layer that is a tower layer's output, got {layer!r}")
    tower = _module(core, ("vision_tower", "vision_model"), model_type, "vision tower")
    block = _encoder_layers(tower, count)[layer % (count + 1) - 1]
    query_norm = getattr(_module(block, ("attention", "self_attn"), model_type, "attention"), "q_norm", None)
    key_norm = getattr(_module(block, ("attention", "self_attn"), model_type, "attention"), "k_norm", None)
    if isinstance(query_norm, nn.Identity) or isinstance(key_norm, nn.Identity):
        query_norm = key_norm = None
    side = _patches_per_side(vision, model_type)
    if family_name == "internvl":
        ratio = _setting(config, "downsample_ratio", model_type)
        index = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
        shuffle = _found(pixel_shuffle(core), core, PIXEL_SHUFFLE, model_type)
        groups = shuffle(index, scale_factor=ratio).reshape(-1, round(ratio**-2))
        output = core.multi_modal_projector
    elif family_name == "idefics3":
        connector = _module(core, ("connector",), model_type, "connector")
        index = torch.arange(side * side, dtype=torch.float64).view(1, side * side, 1)
        scale = _setting(connector, "scale_factor", model_type)
        shuffle = _found(pixel_shuffle(connector), connector, PIXEL_SHUFFLE, model_type)
        groups = shuffle(index, scale).reshape(-1, scale**2)
        output = connector
    elif family_name == "llava":
        groups = torch.arange(side * side).view(-1, 1)
        output = core.multi_modal_projector
    else:  # gemma3: average pooling of kernel x kernel patches, row-major
        per_side = round(_setting(config, "mm_tokens_per_image", model_type) ** 0.5)
        kernel = side // per_side
        grid = torch.arange(side * side).view(per_side, kernel, per_side, kernel)
        groups = grid.permute(0, 2, 1, 3).reshape(per_side * per_side, kernel * kernel)
        output = core.multi_modal_projector
    return ViTGroups(
        model_type=model_type,
        block=block,
        norm=_attribute(block, _NORMS, "pre-attention norm"),
        query=_projection(block, ("q_proj",)),
        key=_projection(block, ("k_proj",)),
        query_norm=query_norm,
        key_norm=key_norm,
        heads=vision.num_attention_heads,
        cls=cls,
        groups=groups.long(),
        output=output,
    )


@dataclass(frozen=True)
class QwenGroups:
    """A Qwen-VL vision transformer: each prompt token is ``unit`` consecutive patches (the merger's 2x2 group)."""

    model_type: str
    tower: nn.Module
    block: nn.Module  # the scored block: the last full-attention one
    heads: int
    unit: int  # spatial_merge_size ** 2
    windowed: bool  # 2.5-VL: the blocks see the patches in window order

    def scores_and_keys(self, grid: torch.Tensor, block_args: tuple, block_kwargs: dict) -> tuple:
        """(prompt tokens,) scores and (prompt tokens, head_dim) keys of all images of one tower call, in the
        prompt's order, from the scored block's captured call (its input, ``cu_seqlens``, ``position_embeddings``)."""
        hidden, bounds, rotary = qwen_block_call(block_args, block_kwargs)
        if bounds is None or rotary is None:
            raise ValueError(
                f"visionzip found no cu_seqlens / position_embeddings in the {self.model_type} vision block's call"
            )
        length = hidden.shape[0]
        qkv = qwen_qkv(self.block.attn)(self.block.norm1(hidden)).view(length, 3, self.heads, -1)
        query, key = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1)  # (heads, patches, head_dim)
        cos, sin = (r.float() for r in rotary)
        turned_q, turned_k = _rotate(query.float(), cos, sin), _rotate(key.float(), cos, sin)
        edges = bounds.tolist()
        scores = torch.cat(
            [attention_received(turned_q[:, a:b], turned_k[:, a:b]) for a, b in zip(edges, edges[1:], strict=False)]
        )
        keys = key.float().mean(dim=0)  # before the rotary embedding: similarity of content, not of place
        scores = scores.view(-1, self.unit).sum(dim=1)
        keys = keys.view(-1, self.unit, keys.shape[-1]).mean(dim=1)
        if self.windowed:
            order = torch.argsort(self._window_index(grid).to(scores.device))
            scores, keys = scores[order], keys[order]
        return scores, keys

    def _window_index(self, grid: torch.Tensor) -> torch.Tensor:
        index = qwen_window_index(self.tower, grid)
        if index is None:
            raise ValueError(f"visionzip cannot find the window order of the {self.model_type} vision tower")
        return index


def find_qwen_groups(model: nn.Module) -> QwenGroups:
    """The scored block of a Qwen-VL vision transformer: the last block with full attention (2.5-VL's
    ``fullatt_block_indexes``; every block elsewhere), whose scores compare patches across the whole image."""
    model_type = model.config.model_type
    tower = _module(model.model, ("visual",), model_type, "vision tower")
    blocks = _module(tower, ("blocks",), model_type, "vision blocks")
    vision = tower.config
    full = full_attention_blocks(vision)
    windowed = full is not None
    index = max(full) if full else len(blocks) - 1
    block = blocks[index]
    for name in ("norm1", "attn"):
        _module(block, (name,), model_type, f"vision block's {name}")
    if qwen_qkv(block.attn) is None:
        raise ValueError(f"visionzip found no qkv projection in the {model_type} vision attention")
    heads = getattr(vision, "num_heads", None) or vision.num_attention_heads
    return QwenGroups(model_type, tower, block, heads, vision.spatial_merge_size**2, windowed)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x`` (heads, patches, head_dim) with ``cos``/``sin`` (patches,
    head_dim)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _patches_per_side(vision, model_type: str) -> int:
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return size // patch


def _setting(owner: object, name: str, model_type: str):
    """``owner.name``, or a ValueError naming the model type (transformers may rename what VisionZip reads)."""
    return _found(getattr(owner, name, None), owner, name, model_type)


def _found(found, owner: object, name: str, model_type: str):
    """``found`` (what ``owner`` holds as ``name``), or a ValueError naming the model type if it is None."""
    if found is None:
        raise ValueError(f"visionzip found no {name} in the {model_type} model's {type(owner).__name__}")
    return found


def _module(parent: nn.Module, names: tuple[str, ...], model_type: str, what: str) -> nn.Module:
    for name in names:
        found = getattr(parent, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ValueError(f"visionzip found no {what} ({' or '.join(names)}) in the {model_type} model")
