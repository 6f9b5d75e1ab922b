"""The FID sample grid: generated images over their real ones with the captions under both, drawn with a font
that has CJK glyphs (Chinese captions)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

# Fonts with CJK glyphs, as (path, face index in a .ttc): Debian's fonts-noto-cjk (face 2 = Simplified Chinese
# shapes), fonts-wqy-microhei, Fedora/Arch's Noto CJK, macOS. PIL's own default font has no CJK glyphs (boxes).
_CJK_FONTS = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc", 2),
    ("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc", 2),
    ("/System/Library/Fonts/PingFang.ttc", 0),
)
_warned_no_cjk_font = False


def cjk_font_file() -> tuple[str, int] | None:
    """(path, face index) of an installed font that covers Chinese: a known path, else what fontconfig picks for
    zh-cn (`fc-match`, where installed); None when neither finds one."""
    import shutil
    import subprocess

    for path, index in _CJK_FONTS:
        if Path(path).is_file():
            return path, index
    if shutil.which("fc-match"):
        try:
            out = subprocess.run(
                ["fc-match", "-f", "%{file}|%{index}|%{lang}", "sans-serif:lang=zh-cn"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        path, _, rest = out.partition("|")
        index, _, langs = rest.partition("|")
        # fontconfig always answers with some font; only one whose languages include Chinese has its glyphs.
        if path and Path(path).is_file() and "zh-cn" in langs.split("|"):
            return path, int(index or 0)
    return None


def caption_font(size: int = 11):
    """A CJK-capable font for captions; PIL's default font (CJK drawn as boxes) with a one-time warning if none."""
    import sys

    from PIL import ImageFont

    global _warned_no_cjk_font
    found = cjk_font_file()
    if found is not None:
        try:
            return ImageFont.truetype(found[0], size, index=found[1])
        except OSError:
            pass
    if not _warned_no_cjk_font:
        _warned_no_cjk_font = True
        print(
            "warning: no CJK font found (install fonts-noto-cjk): Chinese captions in sample grids show as boxes",
            file=sys.stderr,
        )
    return ImageFont.load_default(size=size)


def _wrap_px(text: str, font, width_px: int, max_lines: int) -> list[str]:
    """Greedy wrap by drawn width: Latin words stay whole, CJK (no spaces) breaks between any two characters."""
    tokens = re.findall(r"[^\s\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]+|\s+|.", text)
    lines, line = [], ""
    for token in tokens:
        candidate = line + token if line.strip() else token.lstrip()
        if line.strip() and font.getlength(candidate) > width_px:
            lines.append(line.rstrip())
            candidate = token.lstrip()
        line = candidate
        while len(line) > 1 and font.getlength(line) > width_px:  # one word wider than the cell: cut it
            cut = len(line) - 1
            while cut > 1 and font.getlength(line[:cut]) > width_px:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line.strip():
        lines.append(line.rstrip())
    return lines[:max_lines]


def sample_grid(
    captions: list[str], generated: list[np.ndarray], real: list[np.ndarray | None], cell: int = 128
) -> Image.Image:
    """One column per caption: the generated image on top, its real image below, the caption under both."""
    from PIL import ImageDraw

    font = caption_font(11)
    text_h = 4 * 13
    # The grid keeps its size; a CJK font's lines are taller than PIL's default font's, so fewer of them fit.
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    max_lines = max(
        [
            n
            for n in range(1, 5)
            if probe.multiline_textbbox((0, 1), "\n".join(["国Ag"] * n), font=font, spacing=1)[3] <= text_h
        ]
        or [1]
    )
    grid = Image.new("RGB", (max(1, len(captions)) * cell, 2 * cell + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for col, (caption, gen, ref) in enumerate(zip(captions, generated, real)):
        x = col * cell
        grid.paste(Image.fromarray(gen).resize((cell, cell), Image.Resampling.NEAREST), (x, 0))
        if ref is not None:
            grid.paste(Image.fromarray(ref).resize((cell, cell), Image.Resampling.NEAREST), (x, cell))
        lines = _wrap_px(
            caption, font, cell - 4, max_lines
        )  # by drawn width: CJK glyphs are twice as wide as Latin ones
        draw.multiline_text((x + 2, 2 * cell + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid
