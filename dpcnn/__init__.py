"""dpcnn: a distributed data-parallel CNN trainer in NumPy, mpi4py and h5py.

The data path reads top to bottom, one module per concern:

    data        IDX -> verified HDF5, and sharded reading of a rank's rows
    layers      forward/backward pairs: conv (im2col), max-pool, ReLU, dense, softmax loss
    model       the CNN spec, its flat parameter/gradient vectors, He initialisation
    malloc      keeps freed memory in the process, so steps do not page-fault
    optim       SGD (momentum, Nesterov, weight decay) and learning-rate schedules
    metrics     loss, accuracy, per-class accuracy, confusion matrix
    comm        the communicator: serial or MPI (all of dpcnn's MPI calls go through it)
    checkpoint  atomic HDF5 checkpoints: save, load, find the newest valid, check a resume
    cli         what every command shares: logging, one-line errors, argument types
    train       the training loop and its command line

and the tools around it: evaluate, predict, plot, bench (one process against
PyTorch) and scaling (P ranks against PyTorch DDP).
"""

__version__ = "0.1.0"
