"""bench/judge_digits.py: its shrink from the trainer's resolution back to 8x8 undoes the loader's own resize, so
the judge rates what the model learned, not the resize."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def judge():
    import judge_digits

    return judge_digits.train_judge()


def test_judge_undoes_the_trainers_resize(judge):
    # What the trainer feeds the model (its own resize of the digits source), taken back to 8x8 by the judge.
    import judge_digits

    from uncond_flax.data.sources import DigitsSource
    from uncond_flax.data.transforms import load_resized

    model, _, _ = judge
    source = DigitsSource()
    raw = np.stack([source.get_raw(i) for i in range(200)])
    for resolution in (8, 16, 24):
        fed = np.stack([load_resized(image, resolution, "L") for image in raw]) / 255.0
        back = judge_digits.undo_resize(fed)
        np.testing.assert_allclose(back, raw / 255.0, atol=2.5 / 255)
    # At 16 px 2x2 means blur the same digits: the least-squares inverse is what lets real digits score as real.
    fed16 = np.stack([load_resized(image, 16, "L") for image in raw]) / 255.0
    inverse = judge_digits.score(model, judge_digits.undo_resize(fed16))["mean_confidence"]
    area = judge_digits.score(model, judge_digits.to_digit_grid(fed16))["mean_confidence"]
    assert inverse > area + 0.04
    noise = np.random.default_rng(0).random((100, 16, 16, 1))  # not digits: still unconfident after the inverse
    assert judge_digits.score(model, judge_digits.undo_resize(noise))["mean_confidence"] < inverse - 0.2
    with pytest.raises(ValueError, match="square"):
        judge_digits.undo_resize(np.zeros((1, 16, 12, 1)))
