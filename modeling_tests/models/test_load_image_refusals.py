"""`load_image` (one picture from a data file: PIL, path or bytes) names what it takes, and where arrays go instead."""

from __future__ import annotations

import numpy as np
import pytest

from aligngpt_hf.models.image_processing_utils_aligngpt import load_image, load_images


def test_load_image_refusal_names_what_it_takes_and_sends_arrays_to_the_processor():
    with pytest.raises(TypeError) as error:
        load_image(np.zeros((8, 8, 3), np.uint8), "sample image 0")
    assert str(error.value) == (
        "sample image 0 is a ndarray, not an image: pass a PIL image, a path or bytes (the processor also takes "
        "numpy/torch arrays, H, W, C or C, H, W).")
    assert load_images([np.zeros((8, 8, 3), np.uint8)])[0].shape == (8, 8, 3)  # what the processor reads: kept as is
