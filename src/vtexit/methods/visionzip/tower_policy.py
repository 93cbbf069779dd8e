"""VisionZip before the language model on towers whose prompt tokens are groups of patches (see
:mod:`vtexit.methods.visionzip.towers`). Each prompt token stays in its own slot: hooks on the tower capture the
scored block's input and, on the module whose output enters the prompt, replace each contextual target with its
group's mean and note which slots each image keeps; the event before decoder layer 0 keeps those slots. So the
language model sees each image's dominant and contextual tokens in the prompt's order of their originals."""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vtexit.core.policy import Policy, PrefillView
from vtexit.core.vision_compat import qwen_tower_grid, set_tower_features, tower_features
from vtexit.methods.fastv.ranking import record_kept
from vtexit.methods.visionzip.selection import apply_plan, zip_plan
from vtexit.methods.visionzip.towers import QwenGroups, ViTGroups


class TowerVisionZipPolicy(Policy):
    """Each image (each tile, on towers that see tiles) keeps ``keep`` of its prompt tokens, split by ``split``."""

    event_layers = frozenset({0})
    renumber_positions = True

    def __init__(self, source: ViTGroups | QwenGroups, split):
        self.source, self.split = source, split  # split(tokens) -> (dominant, contextual)
        self._local = threading.local()  # this thread's tower calls: the captured block input, the kept slots

    def outer_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        source = self.source
        hooks = [source.block.register_forward_pre_hook(self._capture("block"), with_kwargs=True)]
        if isinstance(source, QwenGroups):
            hooks.append(source.tower.register_forward_pre_hook(self._capture("tower"), with_kwargs=True))
            hooks.append(source.tower.register_forward_hook(self._zip_qwen))
        else:
            hooks.append(source.output.register_forward_hook(self._zip_vit))
        return hooks

    def _capture(self, name: str):
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not hasattr(self._local, "seen"):
                self._local.seen = {}
            self._local.seen[name] = (args, kwargs)

        return capture

    def _taken(self, name: str) -> tuple:
        """The captured call ``name`` of this tower call, forgotten here so that no activation outlives the call."""
        found = getattr(self._local, "seen", {}).pop(name, None)
        if found is None:
            raise ValueError(f"visionzip did not see the {self.source.model_type} vision tower's {name} run")
        return found

    def _note(self, kept: torch.Tensor) -> None:
        """Keep each tower call's slots until the next prefill's event reads them (generate computes the image
        features before it calls the model, so no hook on the model's call could tell one prompt's from the next)."""
        if not hasattr(self._local, "kept"):
            self._local.kept = []
        self._local.kept.append(kept)

    def _zip_vit(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        source = self.source
        block_args, block_kwargs = self._taken("block")
        hidden = block_args[0] if block_args else block_kwargs["hidden_states"]
        scores, keys = source.scores_and_keys(hidden)
        if output.shape[1] != source.tokens:
            raise ValueError(
                f"visionzip expects {source.tokens} prompt tokens per image from the {source.model_type} projector, "
                f"got {output.shape[1]}"
            )
        kept, targets, weights = zip_plan(scores, keys, *self.split(source.tokens))
        self._note(kept.flatten())
        return apply_plan(output, targets, weights.to(output.device))

    def _zip_qwen(self, module: nn.Module, args: tuple, output: Any) -> Any:
        tower_args, tower_kwargs = self._taken("tower")
        grid = qwen_tower_grid(tower_args, tower_kwargs)
        scores, keys = self.source.scores_and_keys(grid, *self._taken("block"))
        sizes = (grid.prod(dim=1) // self.source.unit).tolist()
        features = tower_features(output)
        pieces: list[list[torch.Tensor]] = [[] for _ in features]
        kept, start = [], 0
        for size in sizes:  # images differ in size: one plan each
            part = slice(start, start + size)
            plan = zip_plan(scores[None, part], keys[None, part], *self.split(size))
            kept.append(plan[0][0])
            for piece, values in zip(pieces, features, strict=True):
                piece.append(apply_plan(values[None, part], plan[1], plan[2].to(values.device))[0])
            start += size
        self._note(torch.cat(kept))
        return set_tower_features(output, [torch.cat(piece) for piece in pieces])

    def keep(self, view: PrefillView) -> torch.Tensor | None:
        found, self._local.kept = getattr(self._local, "kept", []), []
        if len(found) != 1:
            raise ValueError(
                f"visionzip needs the {self.source.model_type} vision tower to run once for each prompt's images, "
                f"it ran {len(found)} times: it chooses tokens in the tower, so pass pixel values (not image "
                "features), images only (not videos), and no get_image_features calls of your own while patched"
            )
        media = view.media
        kept = _expanded(found[0].to(media.device), media)
        mask = view.text | torch.zeros_like(media).masked_scatter(media, kept)
        record_kept(view, mask)
        return mask


def _expanded(kept: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
    """``kept`` (one flag per visual token the tower made) for the prompt's visual slots ``media`` (batch, length).
    Where generate encodes the media first (transformers 5.25, see transformers_compat.generate_encodes_media_first),
    beam search and ``num_return_sequences`` encode each row's images once and repeat them for the row's copies
    (consecutive rows): each copy keeps what its row keeps. Elsewhere (5.17) generate repeats the pixel inputs, the
    tower runs on what each copy holds and ``kept`` already has a flag for every slot."""
    total = int(media.sum())
    if total == kept.numel():
        return kept
    counts = media.sum(dim=1).tolist()
    copies = total // max(1, kept.numel())
    if copies * kept.numel() != total or len(counts) % copies:
        raise ValueError(
            f"visionzip chose among {kept.numel()} visual tokens, the prompt holds {total} (images only, not videos)"
        )
    pieces, start = [], 0
    for row in range(0, len(counts), copies):
        pieces += [kept[start : start + counts[row]]] * copies
        start += counts[row]
    return torch.cat(pieces)
