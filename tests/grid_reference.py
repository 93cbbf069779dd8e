"""Where each visual token sits, found by hand from the model's own vision features (not with vtexit's code).

Each family's feature path is run unpatched and its output cut into frames by what it is: per InternVL tile, Idefics3
crop and Gemma3 image the feature count of that tile (a square); per anyres image the base tile's patch count from
the vision tower, then rows ended by the model's ``image_newline`` vector; per OneVision video its frames and one
newline. The frames are then handed out to the prompt's media tokens in row-major order of the batch, by walking.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Place = tuple[object, int, int, int, int]  # (frame label, row, col, frame height, frame width)


def _squares(features: torch.Tensor, label: str) -> list[Place]:
    """(frames, tokens, dim) features: each frame a square grid, row-major."""
    frames, tokens = features.shape[:2]
    side = math.isqrt(tokens)
    assert side * side == tokens, f"{tokens} tokens per frame is not a square"
    return [((label, f), t // side, t % side, side, side) for f in range(frames) for t in range(tokens)]


def _rows_ended_by_newlines(features: torch.Tensor, newline: torch.Tensor, label: object) -> list[Place]:
    """Features cut into rows, each ended by a token equal to ``newline``: the patches one frame, the newlines
    another (a column)."""
    is_newline = (features == newline).all(-1).tolist()
    assert is_newline and is_newline[-1], "the high-res part ends with a newline"
    height = sum(is_newline)
    width = is_newline.index(True)
    places, row, col = [], 0, 0
    for nl in is_newline:
        if nl:
            assert col == width, "every row holds as many patches"
            places.append(((label, "newline"), row, 0, height, 1))
            row, col = row + 1, 0
        else:
            places.append(((label, "patches"), row, col, height, width))
            col += 1
    return places


def _tile_tokens(model: nn.Module, tile: torch.Tensor) -> int:
    """Patch tokens the vision tower gives one tile (the CLS token dropped where the config drops it)."""
    with torch.no_grad():
        out = model.model.vision_tower(tile.unsqueeze(0), output_hidden_states=True)
    tokens = out.hidden_states[model.config.vision_feature_layer].shape[1]
    return tokens - int(model.config.vision_feature_select_strategy == "default")


@torch.no_grad()
def frames_by_kind(model: nn.Module, inputs: dict) -> dict[int, list[Place]]:
    """Per media token id, the places of its tokens in fill order."""
    config, core = model.config, model.model
    kind = config.model_type
    if kind in ("llava_next", "llava_onevision"):
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        out = {}
        if "pixel_values" in inputs:
            images = core.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output
            base = _tile_tokens(model, inputs["pixel_values"][0][0])
            side = math.isqrt(base)
            places = []
            for i, features in enumerate(images):
                places += [((i, "base"), t // side, t % side, side, side) for t in range(base)]
                places += _rows_ended_by_newlines(features[base:], core.image_newline, i)
            out[config.image_token_id] = places
        if "pixel_values_videos" in inputs:
            videos = core.get_video_features(inputs["pixel_values_videos"]).pooler_output
            frames = inputs["pixel_values_videos"].shape[1]
            places = []
            for v, features in enumerate(videos):
                if not (features[-1] == core.image_newline).all():  # transformers < 5.24 appends it in forward
                    features = torch.cat([features, core.image_newline[None]])
                places += _squares(features[:-1].reshape(frames, -1, features.shape[-1]), f"video {v}")
                places.append(((v, "video newline"), 0, 0, 1, 1))
            out[config.video_token_id] = places
        return out
    if kind in ("internvl", "gemma3", "llava"):  # one square per tile / image
        features = core.get_image_features(inputs["pixel_values"]).pooler_output
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        return {config.image_token_id: _squares(features, "tile")}
    if kind in ("idefics3", "smolvlm"):
        seen = {}
        hook = core.connector.register_forward_hook(lambda m, a, out: seen.update(crops=out))
        try:
            core.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
        finally:
            hook.remove()
        return {config.image_token_id: _squares(seen["crops"], "crop")}
    raise ValueError(f"no hand reference for {kind}")


def hand_places(model: nn.Module, inputs: dict, input_ids: torch.Tensor | None = None) -> list[list[Place | None]]:
    """Per row, per position: None at text, else the visual token's place (frame labels unique in the batch)."""
    ids = (inputs["input_ids"] if input_ids is None else input_ids).tolist()
    places: list[list[Place | None]] = [[None] * len(row) for row in ids]
    for token, queue in frames_by_kind(model, inputs).items():
        queue = list(queue)
        for b, row in enumerate(ids):
            for p, t in enumerate(row):
                if t == token:
                    places[b][p] = queue.pop(0)
        assert not queue, f"{len(queue)} visual features left over"
    return places


def blocks_by_hand(places: list[Place | None], stride: int) -> dict[int, list[int]]:
    """One row's pooling blocks: leader position -> the positions of its block (same frame, same stride x stride
    cell of the frame's grid), found by comparing every pair."""
    blocks: dict[int, list[int]] = {}
    for p, place in enumerate(places):
        if place is None or place[1] % stride or place[2] % stride:
            continue
        blocks[p] = [
            q
            for q, other in enumerate(places)
            if other is not None
            and other[0] == place[0]
            and other[1] // stride == place[1] // stride
            and other[2] // stride == place[2] // stride
        ]
    return blocks
