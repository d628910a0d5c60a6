"""dpcnn's recipe in PyTorch: the reference for accuracy and time to accuracy.

    python scripts/torch_reference.py --data data/mnist.h5 --epochs 8 --seed 0 --threads 2

The same model (``dpcnn.torchref``), data and samples as ``python -m dpcnn.train``: the same
validation hold-out (``--val-size``, drawn as dpcnn draws it), the same sample order of every
epoch (dpcnn's ``epoch_order`` over the remaining rows), standardised inputs, global batch 64
(the last partial batch dropped), SGD with lr 0.05, momentum 0.9 Nesterov, weight decay 5e-4,
dpcnn's cosine schedule per step. The weights start from PyTorch's default initialisation
(``--init he`` for dpcnn's He-normal instead). After every epoch it evaluates the validation
and test sets and prints one JSON record (``--out FILE`` also writes them, one a line), with
``elapsed_seconds`` counted like dpcnn's: from before the data is read to the end of the
epoch's evaluation.

PyTorch is not a dependency of dpcnn: pip install torch --index-url https://download.pytorch.org/whl/cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpcnn.data import Split, epoch_order, holdout
from dpcnn.model import ModelSpec
from dpcnn.optim import Schedule
from dpcnn.torchref import torch_model


def nchw(x: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float32 -> a (N, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(mean loss, accuracy) over x, y."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += nn.functional.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/mnist.h5"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="initial weights (torch.manual_seed) and sample order")
    p.add_argument("--val-size", type=int, default=5000, help="training samples held out (dpcnn's draw)")
    p.add_argument("--val-seed", type=int, default=0)
    p.add_argument("--init", choices=("torch", "he"), default="torch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the records here, one JSON object a line")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    with Split(a.data, "train") as tr, Split(a.data, "test") as te:
        train_rows, val_rows = holdout(tr.n, a.val_size, a.val_seed)
        x_all, y_all = tr.read(0, tr.n)
        xt, yt = te.read(0, te.n)
        spec = ModelSpec(input_shape=tr.image_shape + (1,), classes=tr.num_classes)
    x_train, y_train = nchw(x_all[train_rows]), torch.from_numpy(y_all[train_rows])
    x_val, y_val = nchw(x_all[val_rows]), torch.from_numpy(y_all[val_rows])
    x_test, y_test = nchw(xt), torch.from_numpy(yt)

    model = torch_model(spec)
    if a.init == "he":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    B, n = a.batch_size, len(train_rows)
    steps = n // B
    schedule = Schedule("cosine", a.lr, a.epochs * steps)
    out = a.out.open("w") if a.out else None
    step = 0
    for epoch in range(a.epochs):
        order = torch.from_numpy(epoch_order(n, a.seed, epoch))
        loss_sum = correct = 0.0
        for k in range(steps):
            idx = order[k * B:(k + 1) * B]
            for g in opt.param_groups:
                g["lr"] = schedule(step)
            logits = model(x_train[idx])
            loss = nn.functional.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * B
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
        val = evaluate(model, x_val, y_val) if len(val_rows) else (None, None)
        test = evaluate(model, x_test, y_test)
        rec = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / (steps * B),
               "train_accuracy": correct / (steps * B), "val_loss": val[0], "val_accuracy": val[1],
               "test_loss": test[0], "test_accuracy": test[1],
               "elapsed_seconds": round(time.perf_counter() - t0, 3), "threads": a.threads,
               "torch": torch.__version__, "init": a.init, "seed": a.seed}
        print(json.dumps(rec), flush=True)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
