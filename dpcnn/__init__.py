"""dpcnn: a distributed data-parallel CNN trainer in NumPy, mpi4py and h5py.

The data path reads top to bottom, one module per concern:

    data       IDX -> verified HDF5, and sharded reading of a rank's rows
    layers     forward/backward pairs: conv (im2col), max-pool, ReLU, dense, softmax loss
    model      the CNN spec, its flat parameter/gradient vectors, He initialisation
    optim      SGD (momentum, Nesterov, weight decay) and learning-rate schedules
    metrics    loss, accuracy, per-class accuracy, confusion matrix
    comm       the communicator: serial or MPI (the only module that imports mpi4py)
    train      the training loop and its command line
"""

__version__ = "0.1.0"
