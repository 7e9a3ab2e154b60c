"""Sweep summary for Hydra multirun: one CSV row of final metrics per job.

A Hydra Callback (configured in train.yaml) whose on_multirun_end runs in the process that launched the
sweep once every job has returned. It reads what each job left in its own folder (.hydra/overrides.yaml
and final_metrics.json) rather than in-memory return values, so it works the same whether the jobs ran
in this process (basic launcher) or as Slurm jobs (submitit launcher)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from scaletrain.train.loggers import FINAL_METRICS_FILE

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.csv"
FIRST_COLUMNS = ["job", "status", "overrides"]


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        row: dict[str, Any] = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": " ".join(overrides)}
        for override in overrides:
            key, _, value = override.lstrip("+~").partition("=")
            row[key] = value
        metrics_file = job_dir / FINAL_METRICS_FILE
        if metrics_file.is_file():
            row.update(status="ok", **json.loads(metrics_file.read_text()))
        else:
            row["status"] = "failed (no final metrics)"
        rows.append(row)
    return sorted(rows, key=lambda r: [int(p) if p.isdigit() else p for p in Path(r["job"]).parts])


def write_summary(sweep_dir: Path) -> Path:
    rows = job_rows(sweep_dir)
    columns = FIRST_COLUMNS + sorted({key for row in rows for key in row} - set(FIRST_COLUMNS))
    path = sweep_dir / SUMMARY_FILE
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            path = write_summary(sweep_dir)
            print(f"sweep summary: {path}", flush=True)
