"""dpcnn: a distributed data-parallel CNN trainer in NumPy, mpi4py and h5py.

    import dpcnn
    clf = dpcnn.load("runs/latest/best.h5")
    clf.predict(images)                                  # uint8 0-255 or float 0-1, (N, H, W)
    dpcnn.fit(dpcnn.Config(epochs=2, out="runs/api"))    # train from Python (mpirun: every rank)

The data path reads top to bottom, one module per concern:

    datasets    the data sets dpcnn knows (names, class names, files, checksums)
    idx         IDX files -> a verified HDF5 file (parsing, checksums, downloads via downloads)
    images      image files and folders: decoding, colour, size, one pixel limit
    h5format    the prepared file's layout: writing it, validated and sharded reading, verify
    data        the sample order, validation hold-out, each rank's micro-batches, augmentation
    inputs      a model's input arrays: the one check, normalisation
    layers      forward/backward pairs: conv (im2col), max-pool, ReLU, dense, softmax loss
    model       the CNN spec, its flat parameter/gradient vectors, initialisation
    optim       SGD (momentum, Nesterov, weight decay) and learning-rate schedules
    exact       order-independent sums: what makes every rank count give the same bits
    metrics     loss, accuracy, per-class accuracy, confusion matrix
    comm        the communicator: serial or MPI (all of dpcnn's MPI calls go through it)
    node        what runs where: host names, usable CPUs, BLAS threads, mpiexec
    step        one synchronous data-parallel step: micro-batches, one allreduce, the update
    watchdog    stop signals and the stall watchdog
    process     the set-up of one training (signals, watchdog, BLAS threads, logging), undone after
    config      the run's configuration, built once, and the facts of a run
    fileio      files written whole or not at all
    checkpoint  verified HDF5 checkpoints and the rules for continuing a run
    records     one Record per evaluation, and where records go (console, TensorBoard)
    rundir      the run directory: lock, config.json, metrics.jsonl, checkpoints
    train       the trainer and its command line
    api         load / predict / export_npz / fit for Python users
    cli         what every command shares: exit statuses, logging, one-line errors, argument types

and the commands around it: prepare (the data command), evaluate, predict, plot, bench (one
process against PyTorch), scaling (P ranks against PyTorch DDP); torchref (the model in PyTorch),
malloc.
"""

import sys as _sys

if _sys.argv[:1] == ["-m"] or _sys.argv[0].rsplit("/", 1)[-1].startswith("dpcnn-"):
    # A dpcnn command is starting (python -m dpcnn.<command>, whose argv[0] is "-m" while its module
    # loads, or a dpcnn-* console script): a Ctrl-C while it imports numpy and h5py, before its own
    # handling, is one line, not a traceback. The exit status stays that of SIGINT.
    def _excepthook(kind, value, tb, _default=_sys.excepthook):
        if issubclass(kind, KeyboardInterrupt):
            print("error: interrupted (Ctrl-C) while starting", file=_sys.stderr)
        else:
            _default(kind, value, tb)

    _sys.excepthook = _excepthook

__version__ = "0.1.0"

__all__ = ["Classifier", "Config", "__version__", "export_npz", "fit", "load"]

# The API is imported on first use (PEP 562), not by `import dpcnn`: `python -m dpcnn.train` and
# `python -m dpcnn.data` then run their module once, as __main__, without importing it first.
_API = {"Classifier": ("api", "Classifier"), "load": ("api", "load"), "export_npz": ("api", "export_npz"),
        "Config": ("config", "Config"), "fit": ("api", "fit")}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'dpcnn' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
