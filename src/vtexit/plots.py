"""Matplotlib figures of what withdrawal does (PNG files; the Agg backend needs no screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .calibrate import CalibrationResult  # noqa: E402


def plot_kl(result: CalibrationResult, path: str | Path) -> Path:
    """KL(full || withdrawn) against K (information migration), eta and the chosen K marked."""
    ks = sorted(result.kl)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(ks, [result.kl[k] for k in ks], marker="o", label="mean KL over calibration rows")
    ax.axhline(result.eta, color="tab:red", linestyle="--", label=f"eta = {result.eta:g}")
    ax.axvline(result.layer, color="tab:green", linestyle=":", label=f"chosen K = {result.layer}")
    ax.set_xlabel("withdrawal layer K")
    ax.set_ylabel("KL(full || withdrawn), next token")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(f"Information migration: KL against K ({result.num_rows} rows)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
