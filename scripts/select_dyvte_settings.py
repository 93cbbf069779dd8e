"""Choose DyVTE's label rule, gate width and threshold by 5-fold cross-validation on *training* rows.

    python scripts/select_dyvte_settings.py LABELS.pt

``LABELS.pt`` is the labels file ``vtexit train-gates --labels`` writes (features, top-1 agreement and loss ratio of
every row at every gated layer). For each setting, gates are fitted on 4/5 of the rows and DyVTE is simulated on
the other fifth (``simulate_exits``: the first gated layer whose gate passes the threshold); the table gives, over
all rows predicted out-of-fold, the mean exit layer and the share of rows whose answer keeps its top-1 there.
No test question is used.
"""

from __future__ import annotations

import sys
import time

import torch

from vtexit.methods.dyvte.gates import DyVTEGates, GatesConfig
from vtexit.methods.dyvte.labels import ExitLabels, LabelRule
from vtexit.methods.dyvte.train import fit_gates, simulate_exits

FOLDS = 5
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
LOSS_RATIOS = (1.03, 1.1, 1.5)
GATE_SIZES = (16, 72)


def main() -> None:
    torch.set_num_threads(1)
    labels = ExitLabels.load(sys.argv[1])
    chunks = torch.randperm(labels.rows, generator=torch.Generator().manual_seed(123)).chunk(FOLDS)
    hidden, num_layers = labels.features.shape[-1] // 2, labels.num_layers
    print(f"{labels.rows} rows, layers {list(labels.layers)}; cells: mean exit layer / % answers kept (out-of-fold)")
    for ratio in LOSS_RATIOS:
        for size in GATE_SIZES:
            begin = time.perf_counter()
            rule_labels = labels.with_rule(LabelRule(1.0, ratio))
            exits = {t: torch.zeros(labels.rows, dtype=torch.long) for t in THRESHOLDS}
            kept = {t: torch.zeros(labels.rows, dtype=torch.bool) for t in THRESHOLDS}
            for fold, held in enumerate(chunks):
                train = torch.cat([c for i, c in enumerate(chunks) if i != fold])
                gates = DyVTEGates(GatesConfig(hidden, num_layers, labels.layers, size))
                fit_gates(gates, rule_labels.select(train), validation=0.0, seed=0, progress=False)
                for t in THRESHOLDS:
                    exits[t][held], kept[t][held] = simulate_exits(gates, labels.select(held), t)
            cells = " ".join(
                f"t={t}: {float(exits[t].float().mean()):.1f}/{100 * float(kept[t].float().mean()):.1f}"
                for t in THRESHOLDS
            )
            print(f"loss_ratio {ratio} gate_size {size} ({time.perf_counter() - begin:.0f} s): {cells}", flush=True)


if __name__ == "__main__":
    main()
