"""Scaling-law fits against synthetic data drawn from known laws, the closed-form optimum against brute
force, and `scaletrain scaling fit/optimal` end to end on a sweep folder laid out like a real multirun."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from scaletrain import cli
from scaletrain.configs.schema import ModelConfig
from scaletrain.plan.memory import count_parameters, non_embedding_parameters
from scaletrain.scaling.fit import (CHINCHILLA_PUBLISHED, ChinchillaLaw, Run, bootstrap_chinchilla, fit_chinchilla,
                                    fit_power_law, kaplan_fits)
from scaletrain.scaling.optimal import chinchilla_optimal, inference_aware_optimal, tokens_for_loss


def synthetic_runs(seed: int, noise: float = 0.01):
    """A 9 x 9 grid of sizes and budgets spanning Hoffmann et al.'s range and beyond, loss x (1 + 1% noise)."""
    rng = np.random.default_rng(seed)
    return [Run(f"n{n:.0e}_d{d:.0e}", n, n, d, float(CHINCHILLA_PUBLISHED(n, d) * (1 + noise * rng.standard_normal())))
            for n in np.geomspace(1e7, 1e11, 9) for d in np.geomspace(1e9, 1e13, 9)]


@pytest.mark.parametrize("seed", [0, 1])
def test_chinchilla_fit_recovers_the_published_constants_from_1_percent_noise(seed):
    law = fit_chinchilla(synthetic_runs(seed))
    assert law.alpha == pytest.approx(0.34, abs=0.03)
    assert law.beta == pytest.approx(0.28, abs=0.03)
    assert law.E == pytest.approx(1.69, abs=0.05)


def test_noiseless_fit_is_exact_and_bootstrap_intervals_cover_the_truth():
    runs = synthetic_runs(0, noise=0.0)
    law = fit_chinchilla(runs)
    for key, value in CHINCHILLA_PUBLISHED.to_dict().items():
        assert getattr(law, key) == pytest.approx(value, rel=1e-3)
    noisy = synthetic_runs(3)
    intervals = bootstrap_chinchilla(noisy, fit_chinchilla(noisy), samples=12, seed=0, coverage=0.98)
    assert intervals["alpha"][0] < intervals["alpha"][1] and intervals["E"][0] < intervals["E"][1]
    assert intervals["alpha"][0] - 0.02 < 0.34 < intervals["alpha"][1] + 0.02


def test_kaplan_power_laws_recover_their_exponents():
    n = np.geomspace(1e6, 1e9, 6)
    law = fit_power_law(n, (8.8e13 / n) ** 0.076)  # Kaplan et al. 2020, eq. 1.1
    assert law.alpha == pytest.approx(0.076) and law.scale == pytest.approx(8.8e13, rel=1e-6)
    runs = [Run("r", x, x, d, float((8.8e13 / x) ** 0.076 if d == 1e12 else (5.4e13 / d) ** 0.095))
            for x in n for d in (1e9, 1e12)]
    fits = kaplan_fits(runs)
    assert fits["L(N)"].alpha == pytest.approx(0.076)


def test_compute_optimal_matches_brute_force_and_inference_shrinks_the_model():
    law = CHINCHILLA_PUBLISHED
    n_star, d_star = law.optimal(1e21)
    sizes = np.geomspace(1e7, 1e12, 20001)
    brute = sizes[np.argmin(law(sizes, 1e21 / (6 * sizes)))]
    assert n_star == pytest.approx(brute, rel=2e-3) and 6 * n_star * d_star == pytest.approx(1e21)
    base = chinchilla_optimal(law, 1e21)
    same = inference_aware_optimal(law, 1e21, 0.0)
    assert same.params == pytest.approx(base.params, rel=1e-3)
    served = inference_aware_optimal(law, 1e21, 1e12)
    assert served.params < base.params and served.tokens > base.tokens
    assert law(served.params, served.tokens) == pytest.approx(base.loss, rel=1e-9)
    assert served.total_flops < chinchilla_optimal(law, 1e21, 1e12).total_flops
    assert tokens_for_loss(law, 1e6, base.loss) == math.inf


def write_sweep(root, law: ChinchillaLaw, seed: int = 0):
    """A multirun folder as `scaletrain train -m` leaves it: job folders with .hydra/config.yaml, and the
    summary.csv of train/summary.py (job, status, overrides, tokens, val_loss, ...)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (width, layers) in enumerate([(32, 2), (48, 2), (64, 3), (96, 3), (128, 4), (192, 4)]):
        for j, tokens in enumerate([2e6, 8e6, 3.2e7]):
            job = f"{i * 3 + j}"
            model = ModelConfig(name="gpt_tiny", vocab_size=512, d_model=width, n_layers=layers, n_heads=4,
                                max_seq_len=128)
            (root / job / ".hydra").mkdir(parents=True)
            (root / job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": vars(model)}))
            loss = float(law(count_parameters(model), tokens) * (1 + 0.005 * rng.standard_normal()))
            rows.append({"job": job, "status": "ok", "overrides": f"model.d_model={width}", "tokens": int(tokens),
                         "val_loss": loss, "step": 10})
    rows.append({"job": "99", "status": "failed (no final metrics)", "overrides": "", "tokens": "", "val_loss": "",
                 "step": ""})
    with open(root / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_scaling_fit_cli_reads_a_sweep_and_writes_pngs(tmp_path, capsys):
    law = ChinchillaLaw(E=1.5, A=60.0, B=300.0, alpha=0.35, beta=0.3)
    write_sweep(tmp_path, law)
    assert cli.main(["scaling", "fit", str(tmp_path), "--bootstrap", "5"]) == 0
    out = capsys.readouterr().out
    assert "18 runs" in out and "tokens/param" in out
    fit = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert fit["chinchilla"]["alpha"] == pytest.approx(0.35, abs=0.1)
    model = ModelConfig(name="x", vocab_size=512, d_model=32, n_layers=2, n_heads=4, max_seq_len=128)
    assert fit["runs"][0]["non_embedding_params"] == non_embedding_parameters(model)
    for name in ("loss_vs_params.png", "iso_flop.png", "frontier.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert cli.main(["scaling", "optimal", "--compute", "1e21", "--inference-tokens", "1e12", "--fit",
                     str(tmp_path / "scaling_fit.json")]) == 0
    assert "inference" in capsys.readouterr().out


def test_scaling_cli_user_errors_exit_2(tmp_path, capsys):
    assert cli.main(["scaling", "fit", str(tmp_path / "missing")]) == 2
    assert cli.main(["scaling", "fit", str(tmp_path)]) == 2  # no summary.csv
    assert cli.main(["scaling", "optimal", "--compute", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "summary.csv" in err


def write_summary(root, points, loss):
    """summary.csv with params columns (no job configs needed): one finished job per (N, D) point."""
    rows = [{"job": str(i), "status": "ok", "overrides": "", "tokens": d, "val_loss": loss(n, d), "params": n,
             "non_embedding_params": n} for i, (n, d) in enumerate(points)]
    with open(root / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_an_exponent_at_its_bound_is_flagged_with_what_to_add(tmp_path, capsys):
    # The loss does not move with tokens over the swept budgets: beta ends on its bound (reported as a result before).
    rng = np.random.default_rng(0)
    points = [(n, d) for n in (1e5, 3e5, 1e6, 3e6) for d in (1e6, 2e6, 4e6)]
    write_summary(tmp_path, points, lambda n, d: 1.5 + 60 / n**0.35 + 0.002 * rng.standard_normal())
    assert cli.main(["scaling", "fit", str(tmp_path), "--bootstrap", "0"]) == 0
    warnings = json.loads((tmp_path / "scaling_fit.json").read_text())["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("Chinchilla beta = 0 sits at its bound [0, 3]")
    assert "add token budgets outside 1e+06..4e+06" in warnings[0]
    assert f"WARNING: {warnings[0]}" in capsys.readouterr().out


def test_fewer_distinct_points_than_constants_is_flagged_or_refused(tmp_path, capsys):
    law = ChinchillaLaw(E=1.5, A=60.0, B=300.0, alpha=0.35, beta=0.3)
    write_summary(tmp_path, [(n, d) for n in (1e5, 1e6) for d in (1e6, 2e6, 4e6)], law)
    assert cli.main(["scaling", "fit", str(tmp_path), "--bootstrap", "0"]) == 0
    warnings = json.loads((tmp_path / "scaling_fit.json").read_text())["warnings"]
    assert any(w.startswith("only 2 distinct model sizes for the 3 constants of E + A/N^alpha") and
               w.endswith("add 1 more model size to the sweep") for w in warnings)
    write_summary(tmp_path, [(1e5, 1e6), (1e5, 2e6), (1e6, 1e6), (1e6, 1e6)], law)  # 4 runs, 3 distinct points
    assert cli.main(["scaling", "fit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("has 3 distinct (model size, token budget) points (4 finished runs, 2 sizes x "
                                     "2 budgets)") in err
    assert "add 2 more finished runs (1 more model size and 1 more token budget)" in err


def test_iso_flop_y_range_follows_the_runs(tmp_path, monkeypatch):
    from scaletrain.scaling import plots

    limits = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: limits.setdefault(path.name, fig.axes[0].get_ylim()))
    runs = synthetic_runs(0)[::7]
    law = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=3.0)  # curves far off the data at the edges
    plots.iso_flop(runs, law, tmp_path / "iso_flop.png")
    low, high = limits["iso_flop.png"]
    losses = [r.loss for r in runs]
    assert low < min(losses) and high > max(losses) and high - low < 1.5 * (max(losses) - min(losses))


def test_score_law_recovers_a_known_logistic_in_log_compute(tmp_path, capsys):
    from scaletrain.scaling.score_fit import ScoreLaw, ScorePoint, fit_score_law

    truth = ScoreLaw(floor=0.25, ceiling=1.0, slope=1.3, log10_midpoint=15.2)
    computes = np.logspace(12, 18, 7)
    exact = fit_score_law([ScorePoint(str(i), c, float(truth(c))) for i, c in enumerate(computes)], 0.25)
    assert (exact.slope, exact.log10_midpoint) == (pytest.approx(1.3, rel=1e-6), pytest.approx(15.2, rel=1e-6))
    # hand-computed: at C_mid the score is half way, one decade above it the share is sigmoid(1.3)
    assert float(truth(10**15.2)) == pytest.approx(0.625)
    assert float(truth(10**16.2)) == pytest.approx(0.25 + 0.75 / (1 + math.exp(-1.3)))
    assert truth.compute_for(0.625) == pytest.approx(10**15.2) and truth.compute_for(0.2) == math.inf
    rng = np.random.default_rng(0)
    rows = []
    for i, (n, d) in enumerate([(n, d) for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9, 1e10)]):
        score = float(truth(6 * n * d)) + 0.005 * rng.standard_normal()
        rows.append({"job": str(i), "status": "ok", "overrides": "", "tokens": d, "val_loss": 3.0, "params": n,
                     "non_embedding_params": n, "task/mc/acc": score})
    with open(tmp_path / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert cli.main(["scaling", "fit", str(tmp_path), "--metric", "task/mc/acc", "--floor", "0.25"]) == 0
    assert "9 runs" in capsys.readouterr().out
    fit = json.loads((tmp_path / "score_fit.task.mc.acc.json").read_text())
    assert fit["law"]["slope"] == pytest.approx(1.3, rel=0.05) and fit["warnings"] == []
    assert fit["law"]["log10_midpoint"] == pytest.approx(15.2, abs=0.05)
    png = (tmp_path / "score_fit.task.mc.acc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert cli.main(["scaling", "fit", str(tmp_path), "--metric", "task/other/acc"]) == 2
    assert "task/mc/acc" in capsys.readouterr().err  # the error names the columns there are


def test_a_flat_score_is_fitted_and_flagged():
    from scaletrain.scaling.score_fit import ScorePoint, fit_score_law, score_warnings

    for score, floor in ((0.5, 0.0), (1 / 3, 0.0), (0.5, 0.3333)):
        points = [ScorePoint(str(i), c, score) for i, c in enumerate([1e10, 1e11, 1e12])]
        law = fit_score_law(points, floor)
        assert law.slope == pytest.approx(0, abs=1e-9) and float(law(1e11)) == pytest.approx(score)
        assert any("does not rise" in w for w in score_warnings(points, law))
