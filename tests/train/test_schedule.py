"""The lr schedule against hand-written tables (10 updates, 2 of warmup, min_lr_ratio 0.1), WSD included."""
import math

import pytest

from train.config import ConfigError, parse_args, resolve
from train.plan import describe
from train.schedule import decay_steps, lr_multiplier

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
    ({"scheduler": "cosine_with_restarts"}, "scheduler must be"),
])
def test_rejects_bad_arguments(kwargs, message):
    args = {"step": 0, "num_training_steps": 10, "warmup_steps": 2, "scheduler": "cosine", **kwargs}
    with pytest.raises(ValueError, match=message):
        lr_multiplier(args.pop("step"), **args)


# ----------------------------------------------------------------------------- warmup-stable-decay

# By hand, 10 updates, 2 of warmup, min_lr_ratio 0.1: warmup k/2, then the peak, then a linear decay over
# the last D = round(f x 10) updates, starting at s = 10 - D: 0.1 + 0.9 x (1 - (k - s) / D).
WSD_TABLE = {
    0.3: [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.4, 0.1],  # D = 3, s = 7
    0.2: [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55, 0.1],  # D = 2, s = 8 (the default fraction)
    0.8: [0.0, 0.5, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125, 0.1],  # D = 8, s = 2 = warmup
}


@pytest.mark.parametrize("fraction", sorted(WSD_TABLE))
def test_wsd_matches_hand_written_table(fraction):
    got = [lr_multiplier(k, num_training_steps=10, warmup_steps=2, scheduler="wsd", min_lr_ratio=0.1,
                         decay_fraction=fraction) for k in range(11)]
    assert got == pytest.approx(WSD_TABLE[fraction], abs=1e-12)


def test_wsd_default_fraction_and_protocol_length():
    """10k updates, 1k warmup, default 0.2: peak until 8000, half way down at 9000, 0.1 + 0.9/2000 last."""
    f = lambda k: lr_multiplier(k, num_training_steps=10_000, warmup_steps=1000, scheduler="wsd", min_lr_ratio=0.1)
    assert (f(500), f(1000), f(7999), f(8000), f(9000)) == pytest.approx((0.5, 1.0, 1.0, 1.0, 0.55), abs=1e-12)
    assert f(9999) == pytest.approx(0.1 + 0.9 / 2000, abs=1e-12) and f(10_000) == pytest.approx(0.1, abs=1e-12)


def test_wsd_over_all_updates_is_the_linear_schedule():
    for k in range(8):
        wsd = lr_multiplier(k, num_training_steps=7, warmup_steps=0, scheduler="wsd", min_lr_ratio=0.25, decay_fraction=1.0)
        assert wsd == pytest.approx(lr_multiplier(k, num_training_steps=7, warmup_steps=0, scheduler="linear",
                                                  min_lr_ratio=0.25), abs=1e-12)


def test_decay_steps_round_to_nearest():
    assert decay_steps(30, 0.1) == 3  # 0.1 x 30 = 3.0000000000000004 in floating point: not 4
    assert (decay_steps(10, 0.25), decay_steps(10, 0.35), decay_steps(3, 0.01), decay_steps(5, 1.0)) == (2, 4, 1, 5)


@pytest.mark.parametrize("fraction, warmup, message", [
    (0.0, 2, r"decay_fraction must be in \(0, 1\], got 0.0"),
    (1.5, 2, r"decay_fraction must be in \(0, 1\], got 1.5"),
    (0.9, 2, "wsd: the decay of 9 updates would start at update 1, before the 2 warmup updates end"),
])
def test_wsd_rejects_bad_fractions(fraction, warmup, message):
    with pytest.raises(ValueError, match=message):
        lr_multiplier(0, num_training_steps=10, warmup_steps=warmup, scheduler="wsd", decay_fraction=fraction)


@pytest.mark.parametrize("flags, message", [
    (["--decay_fraction", "0"], r"--decay_fraction must be in \(0, 1\], got 0.0"),
    (["--scheduler", "wsd", "--decay_fraction", "0.95"],
     r"--scheduler wsd: the decay \(95 of 100 updates, --decay_fraction 0.95\) would start before the 10 warmup"),
])
def test_config_checks_the_decay(flags, message):
    argv = ["--model_config", "configs/llama_9m.json", "--batch_size", "2", "--num_training_steps", "100",
            "--warmup_steps", "10", *flags]
    with pytest.raises(ConfigError, match=message):
        resolve(parse_args(argv))


def test_config_accepts_wsd_and_the_fraction_reaches_the_plan():
    config, _ = resolve(parse_args(["--model_config", "configs/llama_9m.json", "--batch_size", "2", "--scheduler", "wsd",
                                    "--num_training_steps", "100", "--warmup_steps", "10", "--decay_fraction", "0.3"]))
    assert (config.scheduler, config.decay_fraction) == ("wsd", 0.3)
    assert "wsd (linear decay over the last 30 updates) to 0.1 x lr" in "\n".join(describe(config, 1))
