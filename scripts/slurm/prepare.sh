#!/usr/bin/env bash
# Prepare the training data on a login node (which has the internet; compute nodes often do not).
# No MPI and no allocation needed: one process downloads the four IDX files, verifies their
# SHA-256 against the pinned values, and writes one HDF5 file that every rank then reads.
#
#   scripts/slurm/prepare.sh                                  # MNIST -> data/mnist.h5
#   scripts/slurm/prepare.sh --dataset fashion-mnist          # -> data/fashion-mnist.h5
#   scripts/slurm/prepare.sh --source /shared/datasets/mnist  # from a directory (.gz or raw)
#   scripts/slurm/prepare.sh --source https://mirror.example/mnist/ --out /scratch/$USER/mnist.h5
#
# Put the output on a file system the compute nodes see (the project directory or scratch),
# then: sbatch scripts/slurm/train.sbatch --data <that file>. Re-running is cheap: an up-to-date,
# verified file is left alone (--force rewrites it). Any other `dpcnn.data prepare` option works;
# check the result with: python -m dpcnn.data info data/mnist.h5
set -euo pipefail
[[ -n ${VENV:-} ]] && source "$VENV/bin/activate"
python -m dpcnn.data prepare "$@"
