"""Learning at scale: the learning rate scaled with the global batch, LARS (oracle-tested in float64,
bit-identical on any rank count and across a resume), the --large-batch recipe, and the warning
that a run has collapsed to guessing."""

import importlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_job
from helpers import assert_same_state, final_state, job_args, metrics, records_without_timings, train

from dpcnn.config import Config, ConfigError, parse_args
from dpcnn.model import CNN, ModelSpec
from dpcnn.optim import LARS, SGD, Schedule, scaled_lr
from dpcnn.records import Monitor
from dpcnn.train import large_batch_recipe, make_optimizer, make_schedule

# ------------------------------------------------------------------------- LARS against a reference


def reference_lars(w: dict, grads: list[dict], lrs: list[float], momentum: float, nesterov: bool,
                   weight_decay: float, trust: float) -> tuple[dict, dict]:
    """LARS as the paper writes it, one layer at a time, in float64 dicts: the weights and velocity after
    the steps (grads[t] and lrs[t] are step t's gradient and learning rate)."""
    w = {k: v.astype(np.float64).copy() for k, v in w.items()}
    v = {k: np.zeros_like(a) for k, a in w.items()}
    for g_t, lr in zip(grads, lrs, strict=True):
        for k in w:
            g = g_t[k].astype(np.float64)
            wn, gn = math.sqrt((w[k] ** 2).sum()), math.sqrt((g ** 2).sum())
            ratio = trust * wn / (gn + weight_decay * wn) if wn > 0 and gn > 0 else 1.0
            d = ratio * (g + weight_decay * w[k])
            v[k] = momentum * v[k] + d
            w[k] = w[k] - lr * (d + momentum * v[k] if nesterov else v[k])
    return w, v


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 5e-4), (False, 0.0)])
def test_lars_is_the_layerwise_rule_of_the_paper(nesterov, weight_decay):
    """Ten steps of LARS on the model's flat float64 vectors equal the per-layer reference to rounding;
    one layer is all zeros (ratio 1) and one gradient is zero (ratio 1)."""
    spec = ModelSpec(channels=(2, 3), hidden=(5,))
    model = CNN(spec, seed=1, dtype=np.float64, init="torch")
    model.p["conv1.b"][:] = 0                                   # ||w|| = 0: ratio 1
    rng = np.random.default_rng(2)
    start = {k: v.copy() for k, v in model.p.items()}
    grads, lrs = [], [0.5, 1.0, 2.0, 2.0, 1.5, 1.0, 0.7, 0.4, 0.2, 0.1]
    opt = make_optimizer(Config(optimizer="lars", trust=0.02, nesterov=nesterov, weight_decay=weight_decay),
                         model)
    assert isinstance(opt, LARS) and len(opt.layers) == len(model.shapes)
    for lr in lrs:
        g = {k: rng.standard_normal(v.shape) * rng.uniform(0.01, 10) for k, v in model.p.items()}
        g["fc1.b"][:] = 0                                       # ||grad|| = 0: ratio 1
        grads.append(g)
        for k, v in model.g.items():
            v[...] = g[k]
        opt.step(lr)
    w, v = reference_lars(start, grads, lrs, 0.9, nesterov, weight_decay, 0.02)
    for k in w:
        np.testing.assert_allclose(model.p[k], w[k], rtol=1e-12, atol=1e-15, err_msg=k)
        np.testing.assert_allclose(model.unflatten(opt.velocity)[k], v[k], rtol=1e-12, atol=1e-15, err_msg=k)
    assert not np.array_equal(model.p["conv1.b"], start["conv1.b"]) or weight_decay == 0


def test_lars_moves_each_layer_by_a_fraction_of_its_size():
    """One plain step (no momentum, no decay): each layer moves by exactly lr * trust * ||w_l||, whatever
    its gradient's scale, where SGD's step follows the gradient's scale."""
    w = np.concatenate([np.full(4, 3.0), np.full(9, 0.1)])
    g = np.concatenate([np.full(4, 1e3), np.full(9, 1e-3)])
    layers = [slice(0, 4), slice(4, 13)]
    w0 = w.copy()
    LARS(w, g.copy(), layers, momentum=0, trust=0.01).step(2.0)
    for s in layers:
        assert np.linalg.norm(w[s] - w0[s]) == pytest.approx(2.0 * 0.01 * np.linalg.norm(w0[s]), rel=1e-12)
    sgd = w0.copy()
    SGD(sgd, g.copy(), momentum=0).step(2.0)
    assert np.linalg.norm(sgd[:4] - w0[:4]) > 1e3
    with pytest.raises(ValueError, match="trust > 0"):
        LARS(w, g, layers, trust=0)


# ------------------------------------------------------------------------- the learning rate and the recipe


def test_learning_rate_scales_from_batch_64():
    assert scaled_lr(0.05, 1024, "none") == 0.05
    assert scaled_lr(0.05, 1024, "linear") == pytest.approx(0.8)
    assert scaled_lr(0.05, 1024, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.05, 64, "sqrt") == 0.05
    with pytest.raises(ValueError):
        scaled_lr(0.05, 64, "cubic")
    cfg = Config(batch_size=256, lr=0.05, lr_scaling="linear", warmup_epochs=1.0)
    s = make_schedule(cfg, steps_per_epoch=10, total_steps=80)
    assert s.lr == pytest.approx(0.2) and s.warmup_steps == 10 and s(9) == pytest.approx(0.2)
    assert make_schedule(Config(batch_size=256), 10, 80).lr == 0.05          # the default: --lr as given
    with pytest.raises(ConfigError, match="lr_scaling"):
        Config(lr_scaling="cubic").check()
    with pytest.raises(ConfigError, match="trust"):
        Config(trust=0.0).check()


def test_the_large_batch_flag_spells_out_the_recipe(tiny_h5, tmp_path):
    cfg, _ = parse_args(["--large-batch", "--batch-size", "1024"])
    r = large_batch_recipe(cfg)
    assert (r.lr_scaling, r.optimizer, r.warmup_epochs, r.large_batch) == ("sqrt", "lars", 2.0, True)
    assert large_batch_recipe(r) == r                                      # spelt out once and for all
    assert large_batch_recipe(cfg.replace(warmup_epochs=0.5)).warmup_epochs == 0.5   # a given warm-up stays
    plain, _ = parse_args(["--batch-size", "1024"])
    assert large_batch_recipe(plain) == plain
    # at the reference batch or below: SGD at the rate per sample of batch 64, no warm-up
    for B, lr in ((64, 0.05), (16, 0.0125)):
        small = large_batch_recipe(parse_args(["--large-batch", "--batch-size", str(B)])[0])
        assert (small.lr_scaling, small.optimizer, small.warmup_epochs) == ("linear", "sgd", 0.0)
        assert make_schedule(small, 10, 80).lr == lr
    # a run says in config.json what the recipe made of it
    assert train(tiny_h5, tmp_path / "run", "--large-batch", "--batch-size", "128", "--max-steps", "2") == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["large_batch"], saved["lr_scaling"], saved["optimizer"], saved["warmup_epochs"]) == \
        (True, "sqrt", "lars", 2.0)
    assert metrics(tmp_path / "run")[-1]["lr"] == pytest.approx(0.05 * math.sqrt(2) * 2 / 6)   # step 2 of 6 warm-up


# ------------------------------------------------------------------------- same bits, resume


@pytest.mark.timeout(300)
def test_lars_gives_the_same_bits_on_1_and_3_ranks(tiny_h5, tmp_path):
    """LARS's ratios come from the reduced gradient and the weights, the same on every rank: 1 and 3
    ranks (batch 28 in micro-batches of 4: 3/2/2) end with equal weights, momentum and records."""
    flags = ("--max-steps", "20", "--batch-size", "28", "--micro-batch", "4", "--eval-every", "7", "--exact",
             "--optimizer", "lars", "--lr-scaling", "sqrt", "--warmup-epochs", "0.5")
    runs = {}
    for p in (1, 3):
        runs[p] = tmp_path / f"p{p}"
        r = run_job(job_args(tiny_h5, runs[p], *flags), nprocs=p)
        assert r.returncode == 0, r.stderr
    assert records_without_timings(runs[3]) == records_without_timings(runs[1])
    assert_same_state(final_state(runs[3]), final_state(runs[1]))
    assert json.loads((runs[1] / "config.json").read_text())["optimizer"] == "lars"


def test_lars_resumes_bit_identical_and_refuses_another_optimizer(tiny_h5, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ("--optimizer", "lars", "--trust", "0.02", "--lr-scaling", "sqrt", "--warmup-epochs", "0.5")
    assert train(tiny_h5, a, "--max-steps", "17", *flags) == 0
    assert train(tiny_h5, b, "--max-steps", "7", *flags) == 0
    capsys.readouterr()
    assert train(tiny_h5, b, "--max-steps", "17", *flags[:2], *flags[4:]) == 1       # another trust
    assert "--trust 0.12 (saved: --trust 0.02)" in capsys.readouterr().err
    assert train(tiny_h5, b, "--max-steps", "17", *flags) == 0
    assert_same_state(final_state(a), final_state(b))
    assert metrics(a)[-1]["test_loss"] == metrics(b)[-1]["test_loss"]
    # the rate of step 17 of 96: sqrt(32 / 64) * 0.05, 6 steps of warm-up, then cosine
    assert metrics(a)[-1]["lr"] == Schedule("cosine", 0.05 * math.sqrt(0.5), 96, warmup_steps=6)(16)


# ------------------------------------------------------------------------- a collapsed run says so


def test_a_run_collapsed_to_guessing_warns_once_naming_the_rate_and_batch(tiny_h5, tmp_path, capsys):
    assert train(tiny_h5, tmp_path / "ok", "--epochs", "3") == 0
    assert "warning" not in capsys.readouterr().err
    # lr 1 kills the network in the first epoch: from then on it predicts the same for every image
    assert train(tiny_h5, tmp_path / "dead", "--epochs", "3", "--lr", "1", "--schedule", "constant") == 0
    err = capsys.readouterr().err
    assert [abs(m["train_loss"] - math.log(10)) < 0.05 for m in metrics(tmp_path / "dead")][1:] == [True, True]
    assert err.count("warning: training loss") == 1 and "the level of guessing (ln 10 = 2.30)" in err, err
    assert "the run has collapsed" in err and "a learning rate of 1 at a global batch of 32" in err, err


def test_the_collapse_warning_waits_for_the_warm_up_and_the_first_epoch(caplog):
    m = Monitor(0.05, 10, batch=1024, peak_lr=0.8, settled=106)
    with caplog.at_level(logging.WARNING, logger="dpcnn"):
        m.check_collapse(2.302, 53)                     # during the warm-up: a run may start there
        m.check_collapse(1.9, 106)                      # learning
        m.check_collapse(math.log(10) * 1.03, 159)      # not within 2% of ln 10
        assert not caplog.records
        m.check_collapse(2.3009, 212)                   # once at chance level: it may still move off it
        assert not caplog.records
        m.check_collapse(2.3009, 265)                   # twice in a row: it sits there
        m.check_collapse(2.3009, 318)
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "step 265" in text and "a learning rate of 0.8 at a global batch of 1024" in text and "(now 0.05)" in text


# ------------------------------------------------------------------------- the time-to-accuracy model


def test_the_ring_allreduce_model_and_epochs_to_target(monkeypatch):
    """scripts/large_batch.py's paper table: the ring allreduce's cost and the first epoch at 99.2%."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    lb = importlib.import_module("large_batch")
    assert lb.ring_ms(1, 824_176, 1e9, 5e-6) == 0
    # 2 ranks: each sends and receives half the buffer twice (reduce-scatter, all-gather): bytes / bandwidth
    assert lb.ring_ms(2, 1_000_000, 1e9, 5e-6) == pytest.approx(1.0 + 2 * 5e-3)
    # many ranks: the bandwidth term tends to twice the buffer's time, the latency term grows with P
    assert lb.ring_ms(256, 1_000_000, 1e9, 0) == pytest.approx(2 * 255 / 256)
    assert lb.ring_ms(256, 0, 1e9, 1e-6) == pytest.approx(2 * 255 * 1e-3)
    rows = [{"epoch": e, "test_accuracy": a} for e, a in ((1, 0.98), (2, 0.9921), (3, 0.991), (4, 0.993))]
    assert lb.epochs_to(rows) == 2 and lb.epochs_to(rows, 0.995) is None
    assert lb.reach([6, 6, 7]) == "6.3 (6, 6, 7)" and lb.reach([5, None, 6]) == "2 of 3 (5, -, 6)"
