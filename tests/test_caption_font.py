"""Chinese captions in the FID sample grid are drawn with real glyphs, not PIL's default-font boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from wudao.eval.grid import _wrap_px, caption_font, cjk_font_file, sample_grid


def _bitmap(text: str, font) -> np.ndarray:
    image = Image.new("L", (40, 24), 0)
    ImageDraw.Draw(image).text((2, 2), text, fill=255, font=font)
    return np.asarray(image)


def test_chinese_characters_render_as_distinct_glyphs():
    if cjk_font_file() is None:
        pytest.skip("no CJK font installed (apt-get install fonts-noto-cjk; .ci/run installs it)")
    font = caption_font(16)
    cat, dog = _bitmap("猫", font), _bitmap("狗", font)
    assert cat.any() and dog.any(), "both characters draw something"
    assert not np.array_equal(cat, dog), (
        "two different characters are two different glyphs (the default font draws one box)"
    )


def test_captions_wrap_within_their_cell():
    font = caption_font(11)
    lines = _wrap_px("一只猫坐在红色的沙发上，旁边有一本打开的书 and a very long caption indeed", font, 124, 4)
    assert 1 < len(lines) <= 4 and all(font.getlength(line) <= 124 for line in lines)
    assert _wrap_px("a dog", font, 124, 4) == ["a dog"]
    grid = sample_grid(["一只猫", "a dog"], [np.zeros((8, 8, 3), np.uint8)] * 2, [None, None])
    assert grid.size[0] == 256
