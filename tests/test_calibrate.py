"""Calibration: the KL is averaged over rows with visual tokens only, and eta is any real number (or refused)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import vtexit
from vtexit.methods.vtw.calibrate import calibrate, check_eta
from vtexit.testing.tiny_models import build_tiny


@pytest.fixture(scope="module")
def llava():
    return build_tiny("llava", num_layers=4)


@torch.no_grad()
def _brute_force_kl(case, batch, k: int) -> torch.Tensor:
    """Per-row KL(full || withdrawn at k) at the last prompt token (left padding), from two plain forwards."""
    full = case.model(**batch).logits[:, -1].float().log_softmax(-1)
    with vtexit.withdraw(case.model, layer=k):
        withdrawn = case.model(**batch).logits[:, -1].float().log_softmax(-1)
    return (full.exp() * (full - withdrawn)).sum(-1)


def test_kl_is_averaged_over_rows_with_visual_tokens_only(llava):
    mixed = llava.inputs([1, 0, 2], text_len=[5, 9, 3], seed=1)
    text_only = llava.inputs([0, 0], text_len=[6, 4], seed=2)  # adds no row to the mean
    result = calibrate(llava.model, [mixed, text_only], eta=0.0, progress=False)
    with_images = llava.media_mask(mixed).any(1)  # the test helper's own record of what it inserted
    assert with_images.tolist() == [True, False, True]
    low, n = vtexit.valid_layer_range(llava.model)
    assert result.num_rows == 2
    for k in range(low, n):
        expected = _brute_force_kl(llava, mixed, k)[with_images]
        assert result.kl[k] == pytest.approx(float(expected.mean()), rel=1e-3, abs=1e-7), k
        assert result.kl_per_row[k] == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-7), k
    assert result.kl[n] == 0.0 and len(result.kl_per_row[n]) == 2
    assert max(result.kl[k] for k in range(low, n)) > 0  # the rows with images do change: the check is not vacuous


def test_a_calibration_set_without_visual_tokens_is_refused(llava):
    batches = [llava.inputs([0, 0], text_len=[6, 4]), llava.inputs([0], text_len=[5], seed=1)]
    with pytest.raises(ValueError, match="no visual tokens"):
        calibrate(llava.model, batches, progress=False)


@pytest.mark.parametrize(
    "eta",
    [float("nan"), float("inf"), -0.5, True, "0.05", None, [0.05], torch.tensor([0.05]), torch.tensor(True), 1j],
    ids=repr,
)
def test_bad_eta_is_refused_with_a_value_error_naming_eta(llava, eta):
    batch = llava.inputs([1], text_len=[4])
    with pytest.raises(ValueError, match="eta must be"):
        calibrate(llava.model, batch, eta=eta, progress=False)


@pytest.mark.parametrize(
    "eta",
    [np.float32(0.05), np.float64(0.05), torch.tensor(0.05), np.array(0.05), Fraction(1, 20), np.int64(0), 0],
    ids=repr,
)
def test_eta_may_be_any_real_number(eta):
    assert check_eta(eta) == pytest.approx(float(eta), rel=1e-6)


def test_numpy_and_tensor_eta_choose_the_first_k_at_or_below_it(llava):
    batch = llava.inputs([1, 2], text_len=[5, 3])
    low, n = vtexit.valid_layer_range(llava.model)
    kl = {k: float(_brute_force_kl(llava, batch, k).mean()) for k in range(low, n)} | {n: 0.0}
    threshold = sorted(kl.values())[1]  # a value the curve reaches before K = N
    expected = next(k for k in sorted(kl) if kl[k] <= threshold * (1 + 1e-3))
    for eta in (np.float32(threshold * (1 + 1e-3)), torch.tensor(threshold * (1 + 1e-3), dtype=torch.float64)):
        result = calibrate(llava.model, batch, eta=eta, progress=False)
        assert result.layer == expected and isinstance(result.eta, float)
