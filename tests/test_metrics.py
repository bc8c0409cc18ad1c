"""StepLogger's speed: img/s over the time spent stepping only (not compiling, not checkpoints or previews), and
MFU of the seconds one step took. The logger's clock is set by the test, so every figure is exact."""

import types

import pytest

from uncond_flax import metrics
from uncond_flax.metrics import StepLogger

METRICS = {"loss": 0.5, "lr": 1e-4, "ema_decay": 0.0, "grad_norm": 1.0, "skipped_steps": 0, "consecutive_skips": 0}
IMAGES_PER_STEP = 16


class Writer:
    def __init__(self):
        self.rows = {}

    def scalars(self, step, values):
        self.rows[step] = values


def test_img_s_leaves_out_compile_and_paused_time_and_mfu_gets_seconds_per_step(monkeypatch):
    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    writer = Writer()
    log = StepLogger(
        writer,
        images_per_step=IMAGES_PER_STEP,
        total_steps=10,
        every=2,
        max_consecutive_skips=3,
        use_ema=False,
        interactive=False,
    )
    seconds_given = []
    log.mfu_of = lambda seconds: seconds_given.append(seconds) or 0.25
    clock.now += 10  # compiling and restoring, before start()
    log.start(0)
    clock.now += 1
    log.push(1, METRICS)
    with log.paused():  # a checkpoint
        clock.now += 20
    clock.now += 1
    log.push(2, METRICS)  # the window's end: both steps written, 2 s of stepping
    assert writer.rows[1]["img/s"] == writer.rows[2]["img/s"] == 2 * IMAGES_PER_STEP / 2
    # mfu_of gets the seconds of one step, not of the window's two.
    assert writer.rows[2]["mfu"] == 0.25 and seconds_given == [pytest.approx(1.0)]

    clock.now += 1
    log.push(3, METRICS)
    clock.now += 4  # stepping time (not paused) counts, from the last window's end
    log.push(4, METRICS)
    assert writer.rows[4]["img/s"] == pytest.approx(2 * IMAGES_PER_STEP / 5) and seconds_given[1] == pytest.approx(2.5)
