"""The paper's hyperparameter grid on a fixed small budget, written as a Markdown table."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from .training import TrainConfig, train

PAPER_GRID = {"lr": [0.001, 0.01, 0.1], "batch_size": [32, 64, 128], "optimizer": ["adam", "sgd"]}


def grid_search(base: TrainConfig, out_table: str | Path, grid: dict = PAPER_GRID) -> list[dict]:
    """Train every combination of `grid` with the budget in `base` (subset, epochs) and
    write `out_table` (.md) and a .json beside it, best dev CIDEr first."""
    rows = []
    combos = list(itertools.product(*grid.values()))
    for values in tqdm(combos, desc="grid", unit="config"):
        settings = dict(zip(grid, values))
        name = "-".join(f"{k}{v}" for k, v in settings.items())
        cfg = replace(base, **settings, out=str(Path(base.out) / name), show_progress=False)
        result = train(cfg)
        rows.append(settings | {k: result[k] for k in ("dev_BLEU-4", "dev_CIDEr", "final_train_loss", "seconds")})
    rows.sort(key=lambda r: -(r["dev_CIDEr"] or 0))
    out_table = Path(out_table)
    out_table.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| rank | optimizer | lr | batch | dev BLEU-4 | dev CIDEr | train loss | seconds |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['optimizer']} | {r['lr']} | {r['batch_size']} | {r['dev_BLEU-4']:.4f} | "
                     f"{r['dev_CIDEr']:.4f} | {r['final_train_loss']:.3f} | {r['seconds']:.0f} |")
    budget = (f"Budget per configuration: the first {base.train_images or 'all'} training images "
              f"({base.epochs} epochs), dev scores on the first {base.dev_images or 'all'} dev images, "
              f"beam {base.eval_beam}; decoder {base.hidden_dim} units, dropout {base.dropout}, seed {base.seed}.")
    out_table.write_text("# Hyperparameter search (the paper's grid)\n\n" + budget + "\n\n" + "\n".join(lines) + "\n")
    return rows
