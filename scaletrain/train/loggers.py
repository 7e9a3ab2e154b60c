"""Where metrics go: a JSONL file in the run folder (always), wandb when logger=wandb, and a tqdm bar with
an ETA. Only rank 0 logs; the other ranks get a logger that drops everything."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
FINAL_METRICS_FILE = "final_metrics.json"
SHOWN = ("loss", "lr", "grad_norm", "tokens_per_s", "val_ppl", "val_accuracy", "val_pearson")  # on the progress bar


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Inf: they become strings so a diverged step is still on record."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, use_wandb: bool = False,
                 wandb_config: Optional[dict] = None, progress_bar: bool = True, run_name: str = "scaletrain"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1) if enabled else None
        self.bar = (tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
                    if enabled and progress_bar else None)
        self.wandb_run = None
        if enabled and use_wandb:
            import wandb  # imported only when asked for: it is slow to import

            # WANDB_MODE (online / offline / disabled) is read by wandb itself.
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "scaletrain"), name=run_name,
                                        dir=str(self.run_dir), config=wandb_config, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _clean({"step": step, **metrics})
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.bar is not None:
            shown = {k: record[k] for k in SHOWN if k in record}
            self.bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in shown.items()},
                                 refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, text: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def finish(self, final_metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        path = self.run_dir / FINAL_METRICS_FILE
        path.write_text(json.dumps(_clean(final_metrics), indent=2) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.summary.update(_clean(final_metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
