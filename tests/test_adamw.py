"""--optimizer adamw: PyTorch's AdamW rule (oracle), learning, the same bits on 1 and 2 ranks, and a
resume that continues bit for bit, its second moment included (issue 21 item 7)."""

import numpy as np
import pytest
from conftest import run_job
from helpers import assert_same_state, final_state, job_args, metrics, records_without_timings, train

from dpcnn import checkpoint as ckpt
from dpcnn.optim import AdamW
from dpcnn.rundir import RunDir

FLAGS = ("--optimizer", "adamw", "--lr", "0.002", "--weight-decay", "0.01")


def test_adamw_is_pytorchs_rule():
    """50 steps with changing rates and gradients of very different sizes: the same weights and both
    moments as torch.optim.AdamW, to float32 rounding."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(1000).astype(np.float32)
    w, g = w0.copy(), np.zeros_like(w0)
    opt = AdamW(w, g, weight_decay=0.01)
    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.AdamW([tw], lr=1e-3, weight_decay=0.01, foreach=False)
    for i in range(50):
        grad = rng.standard_normal(1000).astype(np.float32) * (0.1 if i % 2 else 10.0)
        lr = 1e-3 * (1 + i % 3)
        g[...] = grad
        opt.step(lr)
        topt.param_groups[0]["lr"] = lr
        tw.grad = torch.tensor(grad)
        topt.step()
    state = topt.state[tw]
    assert np.abs(w - w0).max() > 0.01                              # it moved
    np.testing.assert_allclose(w, tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(opt.velocity, state["exp_avg"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(opt.second, state["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-6)
    assert opt.t == int(state["step"]) == 50


def test_adamw_learns_and_resumes_bit_for_bit(tiny_h5, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(tiny_h5, a, "--epochs", "2", *FLAGS) == 0
    assert metrics(a)[-1]["test_accuracy"] > 0.9
    s = final_state(a)
    assert s.second is not None and set(s.second) == set(s.params)
    assert train(tiny_h5, b, "--epochs", "2", "--max-steps", "7", *FLAGS) == 0
    capsys.readouterr()
    assert train(tiny_h5, b, "--epochs", "2", "--lr", "0.002") == 1                 # SGD cannot continue it
    assert "--optimizer sgd (saved: --optimizer adamw)" in capsys.readouterr().err
    assert train(tiny_h5, b, "--epochs", "2", *FLAGS) == 0
    assert_same_state(final_state(a), final_state(b))
    np.testing.assert_array_equal(np.concatenate([v.ravel() for v in final_state(a).second.values()]),
                                  np.concatenate([v.ravel() for v in final_state(b).second.values()]))
    assert metrics(a)[-1]["test_loss"] == metrics(b)[-1]["test_loss"]


def test_an_adamw_checkpoint_without_its_second_moment_is_refused(tiny_h5, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_h5, out, "--max-steps", "3", *FLAGS) == 0
    path = RunDir(out).checkpoints()[0]
    s = ckpt.load(path)
    s.second = None
    ckpt.save(path, s)                                # written whole, digest and all: only the moment is missing
    capsys.readouterr()
    assert train(tiny_h5, out, "--max-steps", "6", *FLAGS) == 1
    assert "holds no second moment for --optimizer adamw" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_adamw_gives_the_same_bits_on_1_and_2_ranks(tiny_h5, tmp_path):
    flags = ("--max-steps", "12", "--eval-every", "6", "--exact", *FLAGS)
    runs = {}
    for p in (1, 2):
        runs[p] = tmp_path / f"p{p}"
        r = run_job(job_args(tiny_h5, runs[p], *flags), nprocs=p)
        assert r.returncode == 0, r.stderr
    assert records_without_timings(runs[2]) == records_without_timings(runs[1])
    assert_same_state(final_state(runs[2]), final_state(runs[1]))
    a, b = final_state(runs[1]).second, final_state(runs[2]).second
    assert all(np.array_equal(a[k], b[k]) for k in a)
