"""The colour probe reads the demo scenes' captions in both languages and the colours of an image."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from wudao.data.demo import SCENE_PALETTE, write_scenes
from wudao.eval.follows import caption_colours, dominant_colours, follows_captions


def test_captions_in_both_languages_name_shape_and_background():
    assert caption_colours("a red circle on a blue background", SCENE_PALETTE) == ("red", "blue")
    assert caption_colours("蓝色背景上的一个红色圆形", SCENE_PALETTE) == ("red", "blue")
    assert caption_colours("A Yellow square on a black background", SCENE_PALETTE) == ("yellow", "black")
    # Not probed: one colour, three colours, no background named, a colour inside another word.
    assert caption_colours("a red bus parked on the street", SCENE_PALETTE) is None
    assert caption_colours("a red and green kite on a blue background", SCENE_PALETTE) is None
    assert caption_colours("a red circle next to a blue square", SCENE_PALETTE) is None
    assert caption_colours("a reddish circle on a blue background", SCENE_PALETTE) is None


def test_the_real_scenes_are_read_right_and_a_grey_blur_is_not(tmp_path):
    write_scenes(tmp_path, n=24, seed=3)
    index = json.loads((tmp_path / "annotations" / "captions_val2017.json").read_text())
    files = {im["id"]: im["file_name"] for im in index["images"]}
    captions = [a["caption"] for a in index["annotations"]]
    images = [
        np.asarray(Image.open(tmp_path / "val2017" / files[a["image_id"]]).convert("RGB")) for a in index["annotations"]
    ]
    report = follows_captions(captions, images, SCENE_PALETTE)
    assert report is not None and report.n_probed == 48 and report.unparsed == 0
    assert report.both_accuracy == 1.0, "the rendered scenes are exactly what their captions say"

    grey = [np.full((64, 64, 3), 128, np.uint8)] * len(captions)
    blurred = follows_captions(captions, grey, SCENE_PALETTE)
    assert blurred.shape_accuracy == 0.0, "a flat image has no shape colour"
    assert blurred.background_accuracy < 0.5
    assert blurred.chance_background == 1 / 6 and blurred.chance_shape == 1 / 5 and blurred.chance_both == 1 / 30


def test_shape_colour_is_the_second_colour_and_needs_enough_pixels():
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = (40, 80, 220)  # blue
    assert dominant_colours(image, SCENE_PALETTE) == ("blue", None)
    image[:20, :20] = (230, 50, 50)  # near red, 10 % of the pixels
    assert dominant_colours(image, SCENE_PALETTE) == ("blue", "red")
    assert follows_captions(["a bus"], [image], SCENE_PALETTE) is None, "nothing to probe is no report, not 0 %"
