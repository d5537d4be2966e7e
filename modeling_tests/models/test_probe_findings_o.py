"""Findings of the training-data probe whose fix belongs in the remote-code unit (`aligngpt_hf.models`), kept as
strict expected failures until it is made there."""

from __future__ import annotations

import numpy as np
import pytest

from aligngpt_hf.models.image_processing_utils_aligngpt import load_image


@pytest.mark.xfail(strict=True, reason="load_image refuses a numpy/torch array while its own message offers one as "
                   "an accepted input; the fix: name only what it accepts, or decode arrays as `load_images` does")
def test_load_image_refusal_does_not_offer_the_array_it_refuses():
    with pytest.raises(TypeError) as error:
        load_image(np.zeros((8, 8, 3), np.uint8), "sample image 0")
    assert "numpy/torch array" not in str(error.value)
