"""Scaling studies: power-law fits on synthetic laws, degenerate inputs, the compute frontier, the depthN size rule,
the model-FLOP count, and a real sweep of two tiny sizes on the test images (budgets, resume, skip, fit CLI)."""

import json
import os

import jax
import numpy as np
import pytest

from infinity_jax import schedules
from infinity_jax.cli import load_config_file
from infinity_jax.models import sizes
from infinity_jax.models.transformer import TransformerConfig
from infinity_jax.scaling import fit, sweep

SET = "tests/assets/emoji3d/set/metadata.jsonl"


def test_fit_recovers_a_known_law_from_noisy_points():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e6, 3e8, 8)
    loss = (2.0 * n) ** -0.23 * np.exp(rng.normal(0.0, 0.01, n.size))  # VAR's L(N), 1 % noise
    law = fit.fit_power_law(n, loss)
    assert abs(law.alpha + 0.23) <= law.alpha_ci < 0.02
    assert law.r < -0.99 and law.n == 8
    assert 1.0 < law.beta < 4.0
    np.testing.assert_allclose(law(n), loss, rtol=0.05)
    # Without noise the fit is exact and the interval closes.
    exact = fit.fit_power_law(n, (0.5 * n) ** -0.1)
    assert np.isclose(exact.alpha, -0.1) and np.isclose(exact.beta, 0.5) and exact.alpha_ci < 1e-9


def test_fit_refuses_degenerate_inputs():
    n = np.asarray([1e6, 1e7, 1e8])
    cases = {
        "at least 3 points": (n[:2], [0.5, 0.4]),
        "3 distinct x": ([1e6, 1e6, 1e7], [0.5, 0.4, 0.3]),
        "positive": (n, [0.5, -0.4, 0.3]),
        "finite": (n, [0.5, np.nan, 0.3]),
        "does not change": (n, [0.5, 0.5, 0.5]),
        "differ in length": (n, [0.5, 0.4]),
    }
    for message, (x, y) in cases.items():
        with pytest.raises(ValueError, match=message):
            fit.fit_power_law(x, y)


def test_pareto_frontier_keeps_only_points_no_cheaper_point_beats():
    c = [1, 2, 2, 3, 4, 5]
    loss = [5.0, 4.0, 4.5, 4.2, 3.0, 3.5]
    assert fit.pareto_frontier(c, loss).tolist() == [0, 1, 4]


def test_depth_rule_and_model_flops():
    layout = sizes.get_size("depth4")
    assert (layout.depth, layout.embed_dim, layout.num_heads, layout.ffn_dim) == (4, 256, 4, 1024)
    with pytest.raises(ValueError, match="depthN"):
        sizes.get_size("depth")
    schedule = schedules.infinity_schedule(1.0, "0.016M")
    model = TransformerConfig.from_size("depth4", bits=16, cond="class", num_classes=10)
    shapes = sweep.parameter_shapes(model, schedule)
    blocks = sum(x.size for x in jax.tree.leaves(shapes["blocks"]))
    flops = sweep.model_flops_per_step(model, schedule, batch=2, text_length=0)
    # 6·N·D for the blocks' matmuls plus attention and the embedding/head: above 6ND, not far above it.
    six_nd = 6 * blocks * 2 * schedule.num_tokens
    assert six_nd < flops < 1.6 * six_nd


def test_scaling_config_sets_the_bit_depth_of_tokenizer_and_model_together():
    config = load_config_file("configs/scaling.py:tokenizer=d32,bits=16")
    assert config.tokenizer.bits == 16 and config.model.bits == 16
    assert load_config_file("configs/scaling.py:tokenizer=d32").model.bits == 32


def _sweep_config(tokens):
    config = load_config_file(
        f"configs/scaling.py:sizes=depth1+depth2,tokenizer=tiny,res=0.004M,batch=8,tokens={tokens},evals=2"
    )
    config.data.path, config.tokenizer.checkpoint, config.data.holdout_every = SET, "random", 3
    config.optim.lr = 3e-3
    return config


def _evaluated_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "eval/loss" in r]


def test_sweep_trains_each_size_to_its_budget_skips_finished_ones_and_fits(tmp_path, capsys):
    root = str(tmp_path)
    infos = [sweep.run_size(_sweep_config(4000), name, root) for name in ("depth1", "depth2")]
    assert [i["num_steps"] for i in infos] == [24, 24]  # ceil(4000 / (8 images × 21 tokens))
    assert all(i["done"] for i in infos)
    assert _evaluated_steps(tmp_path / "depth1") == [12, 24]  # sweep.evals = 2 evaluations per run
    assert infos[0]["params"] < infos[1]["params"] and infos[0]["flops_per_step"] < infos[1]["flops_per_step"]
    c = infos[1]["layout"]["embed_dim"]  # per block: qkv 3C², proj C², FFN 8C², 8C of biases, 6C AdaLN, 2 heads
    assert infos[1]["non_embedding_params"] == 2 * (12 * c**2 + 14 * c + 2)
    # A finished size is skipped without training again.
    sweep.run_size(_sweep_config(4000), "depth2", root)
    assert "depth2: done (24 steps), skipped" in capsys.readouterr().out
    runs = [fit.load_run(str(tmp_path / n)) for n in ("depth1", "depth2")]
    assert all(r.evals[-1]["eval/loss"] < 0.67 for r in runs)  # held-out loss well under chance (ln 2 = 0.693)
    assert runs[1].evals[-1]["tokens"] == 24 * 168 and runs[1].evals[-1]["flops"] == 24 * infos[1]["flops_per_step"]
    # Two sizes cannot give L(N); the CLI says so and still fits the compute frontier from every evaluation.
    assert fit.main([str(tmp_path / "depth1"), str(tmp_path / "depth2"), "--out", str(tmp_path / "fit")]) == 0
    out = capsys.readouterr().out
    assert "not fitted: a power-law fit needs at least 3 points, got 2" in out
    assert os.path.getsize(tmp_path / "fit" / "loss_vs_compute.png") > 1000
    assert fit.main([str(tmp_path / "fit")]) == 1  # not a run folder
    assert "no run.json" in capsys.readouterr().err


def test_a_stopped_size_is_not_done_and_resumes_to_its_budget(tmp_path):
    stopped = sweep.run_size(_sweep_config(4000), "depth1", str(tmp_path), max_minutes=1e-9)  # stops after step 1
    assert not stopped["done"]
    with open(tmp_path / "depth1" / sweep.RUN_INFO) as f:
        assert not json.load(f)["done"]
    assert _evaluated_steps(tmp_path / "depth1") == [1]
    resumed = sweep.run_size(_sweep_config(4000), "depth1", str(tmp_path))
    assert resumed["done"] and _evaluated_steps(tmp_path / "depth1") == [1, 12, 24]


def test_fit_cli_on_a_vocabulary_sweep(tmp_path, capsys):
    """Runs of two bit depths, written as the sweep writes them, get a law each (and the plots a line each)."""
    rng = np.random.default_rng(1)
    for bits, alpha in ((16, -0.2), (32, -0.3)):
        for n in (1e5, 1e6, 1e7, 1e8):
            path = tmp_path / f"d{bits}_{int(n)}"
            path.mkdir()
            info = {"name": path.name, "params": n * 1.2, "non_embedding_params": n, "bits": bits,
                    "tokens_per_step": 1000, "flops_per_step": 6 * n * 1000, "done": True}  # fmt: skip
            (path / "run.json").write_text(json.dumps(info))
            lines = [
                {"step": s, "eval/loss": float((n * s / 1e3) ** (alpha / 2) * (1 + rng.normal(0, 0.005)))}
                for s in (100, 1000)
            ]
            lines[-1]["eval/loss"] = float(n**alpha * 3 * (1 + rng.normal(0, 0.005)))
            (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert fit.main([str(p) for p in sorted(tmp_path.iterdir())] + ["--out", str(tmp_path / "out")]) == 0
    fitted = json.loads((tmp_path / "out" / "fit.json").read_text())["fits"]
    assert abs(fitted["16"]["N"]["alpha"] + 0.2) < 0.02 and abs(fitted["32"]["N"]["alpha"] + 0.3) < 0.02
    assert "bits d=16: 4 runs; L(N) at 1e+06 tokens each" in capsys.readouterr().out
    # The largest size stopped after its first evaluation: every size is compared at that budget instead.
    stalled = tmp_path / "d32_100000000"
    info = json.loads((stalled / "run.json").read_text())
    (stalled / "run.json").write_text(json.dumps({**info, "done": False}))
    first = (stalled / "metrics.jsonl").read_text().splitlines()[0]
    (stalled / "metrics.jsonl").write_text(first + "\n")
    runs = [fit.load_run(str(p)) for p in sorted(tmp_path.glob("d32_*"))]
    entry = fit.fit_runs(runs, "eval/loss", "non_embedding_params")[32]
    assert entry["tokens"] == 100 * 1000 and entry["unfinished"] == ["d32_100000000"]
    assert sorted(loss for _, loss, _ in entry["last"]) == sorted(r.evals[0]["eval/loss"] for r in runs)
    assert abs(entry["N"].alpha + 0.15) < 0.02  # the early-budget law (alpha / 2), not a mix of budgets
    assert fit.main([str(p) for p in sorted(tmp_path.glob("d32_*"))]) == 0
    assert "4 runs, unfinished: d32_100000000; L(N) at 1e+05 tokens each" in capsys.readouterr().out
    # Stopped before the others' first evaluation (at step 50): left out of L(N), the others fitted at their budget.
    (stalled / "metrics.jsonl").write_text(json.dumps({"step": 50, "eval/loss": 0.9}) + "\n")
    runs = [fit.load_run(str(p)) for p in sorted(tmp_path.glob("d32_*"))]
    entry = fit.fit_runs(runs, "eval/loss", "non_embedding_params")[32]
    assert entry["tokens"] == 1000 * 1000 and entry["left_out"] == ["d32_100000000"] and len(entry["last"]) == 3
    assert abs(entry["N"].alpha + 0.3) < 0.03
    assert fit.main([str(p) for p in sorted(tmp_path.glob("d32_*"))]) == 0
    assert "(not at that budget, left out of L(N): d32_100000000)" in capsys.readouterr().out
