r"""The scaling-law fit behind a study's speedup: L(D) = alpha D^(-B) + beta over AdamW's budgets.

An optimizer that reaches loss L with D tokens has speedup D_AdamW(L) / D with
D_AdamW(L) = (alpha / (L - beta))^(1/B) (`PowerLawFit.tokens_for`; train/study/report.py).

The fit, numpy only: for a fixed beta, log(L - beta) = log alpha - B log D is a straight line (least
squares); beta is scanned on a grid of 400 values in [0, min L), then refined by golden-section search
between the grid points around the best one; the beta whose line gives the smallest sum of squared
residuals in L itself is kept. With exactly three budgets the three parameters fit exactly (residuals
~0): the residuals then say nothing about the law, and the report says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class PowerLawFit:
    """L(D) = alpha D^(-exponent) + beta, and the data it was fitted to."""

    alpha: float
    exponent: float
    beta: float
    tokens: list[float]
    losses: list[float]

    def __call__(self, tokens: float) -> float:
        return self.alpha * tokens ** (-self.exponent) + self.beta

    @property
    def residuals(self) -> list[float]:
        return [float(loss - self(d)) for d, loss in zip(self.tokens, self.losses)]

    def tokens_for(self, loss: float) -> float:
        """D_AdamW(L): the tokens at which the fitted law reaches `loss` (inf at or below its floor beta)."""
        if loss <= self.beta or self.exponent <= 0:
            return math.inf
        return (self.alpha / (loss - self.beta)) ** (1.0 / self.exponent)


def _line_fit(log_d: np.ndarray, losses: np.ndarray, beta: float) -> tuple[float, float, float]:
    """(alpha, exponent, sum of squared residuals in L) of the log-linear least squares at this beta."""
    slope, intercept = np.polyfit(log_d, np.log(losses - beta), 1)
    alpha, exponent = math.exp(intercept), -slope
    fitted = alpha * np.exp(-exponent * log_d) + beta
    return alpha, exponent, float(np.sum((losses - fitted) ** 2))


def fit_power_law(tokens: list[float], losses: list[float], grid: int = 400) -> PowerLawFit:
    """Least-squares L(D) = alpha D^(-B) + beta with 0 <= beta < min L (module docstring: grid, then golden section)."""
    if len(tokens) < 3 or len(set(tokens)) != len(tokens):
        raise ValueError(f"the fit needs losses at 3 or more distinct budgets, got {len(set(tokens))}")
    log_d, values = np.log(np.asarray(tokens, dtype=np.float64)), np.asarray(losses, dtype=np.float64)
    top = float(values.min()) * (1 - 1e-12)
    betas = np.linspace(0.0, top, grid)
    errors = [_line_fit(log_d, values, b)[2] for b in betas]
    best = int(np.argmin(errors))
    low, high = betas[max(best - 1, 0)], betas[min(best + 1, grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(200):  # golden section on the profile error between the neighbours of the best grid point
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if _line_fit(log_d, values, a)[2] <= _line_fit(log_d, values, b)[2]:
            high = b
        else:
            low = a
    beta = min(((x, _line_fit(log_d, values, x)[2]) for x in ((low + high) / 2, betas[best])), key=lambda t: t[1])[0]
    alpha, exponent, _ = _line_fit(log_d, values, beta)
    return PowerLawFit(float(alpha), float(exponent), float(beta), [float(d) for d in tokens], [float(x) for x in losses])
