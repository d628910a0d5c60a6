"""The data sets dpcnn knows by name: what each is, and how its files are verified.

    DATASETS["mnist"].class_names          # ('0', '1', ..., '9')
    DATASETS["fashion-mnist"].mirrors      # where its four IDX files are downloaded from

A data set here is four IDX files (see ``dpcnn.idx``) pinned by the SHA-256 and size of each
uncompressed payload, so any mirror and any compression (or none) verifies. Image folders
(``prepare --from-folder``, ``dpcnn.images``) need no entry: their classes are their subfolders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a data set is and how to verify it.

    sha256: file name (without .gz) -> SHA-256 of the uncompressed IDX payload, so any
        mirror and any compression (or none) verifies.
    size: file name -> bytes of the uncompressed payload. A file whose header states more is
        refused before it is decompressed, and a download larger than a compressed copy of it
        can be is cut off. Files without one are limited to dpcnn.idx.MAX_PAYLOAD_BYTES.
    """

    name: str
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...] = ()
    sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)
    size: Mapping[str, int] = dataclasses.field(default_factory=dict)


_MNIST_SIZES = {  # 60000 and 10000 images of 28x28 (both data sets)
    "train-images-idx3-ubyte": 47040016, "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016, "t10k-labels-idx1-ubyte": 10008,
}

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        sha256={  # uncompressed payloads
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        size=_MNIST_SIZES,
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={  # uncompressed payloads of the official .gz files (MD5s in zalandoresearch/fashion-mnist)
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        size=_MNIST_SIZES,
    ),
}
