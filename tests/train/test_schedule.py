"""The lr schedule against a hand-written table (10 updates, 2 of warmup, min_lr_ratio 0.1)."""
import math

import pytest

from train.schedule import lr_multiplier

# Computed by hand: warmup k/2; cosine 0.1 + 0.9 * (1 + cos(pi * (k - 2) / 8)) / 2; linear 0.1 + 0.9 * (1 - (k - 2) / 8).
TABLE = {
    "cosine": [0.0, 0.5, 1.0, 0.965746, 0.868198, 0.722208, 0.55, 0.377792, 0.231802, 0.134254, 0.1],
    "linear": [0.0, 0.5, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125, 0.1],
    "constant": [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("scheduler", sorted(TABLE))
def test_matches_hand_written_table(scheduler):
    got = [lr_multiplier(k, num_training_steps=10, warmup_steps=2, scheduler=scheduler, min_lr_ratio=0.1) for k in range(11)]
    assert got == pytest.approx(TABLE[scheduler], abs=1e-6)


def test_no_warmup_starts_at_peak_and_cosine_reaches_min_at_the_end():
    values = [lr_multiplier(k, num_training_steps=4, warmup_steps=0, min_lr_ratio=0.0) for k in range(5)]
    assert values == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])


def test_protocol_shape_60m():
    """10k updates, 1k warmup: lr 0 first, peak at 1000, half way down at 5500, the last update near 10%."""
    f = lambda k: lr_multiplier(k, num_training_steps=10_000, warmup_steps=1000, min_lr_ratio=0.1)
    assert (f(0), f(500), f(1000), f(5500)) == pytest.approx((0.0, 0.5, 1.0, 0.55))
    assert 0.1 < f(9999) < 0.10001


@pytest.mark.parametrize("kwargs, message", [
    ({"step": -1}, "step must be"),
    ({"step": 11}, "step must be"),
    ({"warmup_steps": 10}, "warmup_steps"),
    ({"scheduler": "cosine_restarts"}, "scheduler must be"),
])
def test_rejects_bad_arguments(kwargs, message):
    args = {"step": 0, "num_training_steps": 10, "warmup_steps": 2, "scheduler": "cosine", **kwargs}
    with pytest.raises(ValueError, match=message):
        lr_multiplier(args.pop("step"), **args)
