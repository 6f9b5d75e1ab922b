"""Does a generated image follow its caption? A colour probe for captions of plain-colour scenes.

FID says whether generated images look like real ones, not whether each one shows what its caption asks for. For
captions that name a background colour and one other (shape) colour, as the demo scenes' do ("a red circle on a
blue background", "蓝色背景上的一个红色圆形"), every pixel is mapped to its nearest palette colour; the most common is
the image's background, the most common of the rest its shape colour. The probe counts how often each matches the
caption. Chance is 1 / colours for the background and 1 / (colours - 1) for the shape (the two differ).

Captions that do not name exactly two palette colours, one of them followed by "background" / "背景", are not
probed (counted as `unparsed`), so the probe stays silent on real MS-COCO captions rather than guessing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Palette = Mapping[str, tuple[Sequence[str], tuple[int, int, int]]]
"""colour name -> (its names in captions, e.g. ("red", "红色"), its RGB)."""

MIN_SHAPE_SHARE = 0.02
"""Pixels a second colour must cover to count as a shape (fewer: the image shows no shape, the shape is wrong)."""

_BACKGROUND = re.compile(r"\s*(background|背景)", re.IGNORECASE)


def caption_colours(caption: str, palette: Palette) -> tuple[str, str] | None:
    """(shape colour, background colour) named by `caption`, or None when it does not name exactly two palette
    colours with one of them marked as the background."""
    spans: list[tuple[int, int, str]] = []
    for colour, (names, _) in palette.items():
        for name in names:
            spans += [
                (m.start(), m.end(), colour)
                for m in re.finditer(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", caption, re.IGNORECASE)
            ]
    named = {colour for _, _, colour in spans}
    if len(named) != 2:
        return None
    backgrounds = {colour for _, end, colour in spans if _BACKGROUND.match(caption, end)}
    if len(backgrounds) != 1:
        return None
    (background,) = backgrounds
    (shape,) = named - backgrounds
    return shape, background


def dominant_colours(image_HWC: np.ndarray, palette: Palette) -> tuple[str, str | None]:
    """(background, shape) colours of a uint8 RGB image: the most common nearest-palette colour, then the most
    common of the others (None when it covers under MIN_SHAPE_SHARE of the pixels)."""
    names = list(palette)
    rgb_KC = np.array([palette[n][1] for n in names], dtype=np.float32)
    pixels_NC = image_HWC.reshape(-1, 3).astype(np.float32)
    nearest_N = ((pixels_NC[:, None, :] - rgb_KC[None]) ** 2).sum(-1).argmin(1)
    counts_K = np.bincount(nearest_N, minlength=len(names))
    order = np.argsort(-counts_K, kind="stable")
    shape = names[order[1]] if counts_K[order[1]] >= MIN_SHAPE_SHARE * len(nearest_N) else None
    return names[order[0]], shape


@dataclass(frozen=True)
class FollowsReport:
    n_probed: int
    """Captions that name a shape and a background colour (the rest are `unparsed`)."""
    unparsed: int
    background_accuracy: float
    shape_accuracy: float
    both_accuracy: float
    """Background and shape colour both as the caption says: the headline figure."""
    chance_background: float
    chance_shape: float
    chance_both: float

    def to_dict(self) -> dict:
        return asdict(self)


def follows_captions(
    captions: Sequence[str], images_NHWC: Sequence[np.ndarray], palette: Palette
) -> FollowsReport | None:
    """How often each generated image shows the colours its caption names; None when no caption can be probed."""
    hits_bg = hits_shape = hits_both = probed = 0
    for caption, image in zip(captions, images_NHWC, strict=True):
        wanted = caption_colours(caption, palette)
        if wanted is None:
            continue
        probed += 1
        background, shape = dominant_colours(np.asarray(image), palette)
        hits_bg += background == wanted[1]
        hits_shape += shape == wanted[0]
        hits_both += background == wanted[1] and shape == wanted[0]
    if not probed:
        return None
    k = len(palette)
    return FollowsReport(
        n_probed=probed,
        unparsed=len(captions) - probed,
        background_accuracy=hits_bg / probed,
        shape_accuracy=hits_shape / probed,
        both_accuracy=hits_both / probed,
        chance_background=1 / k,
        chance_shape=1 / (k - 1),
        chance_both=1 / (k * (k - 1)),
    )
