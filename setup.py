"""tfrs_yambda: two-tower candidate retrieval for Yandex Yambda with TFRS."""

import pathlib

import setuptools

setuptools.setup(
    name="tfrs_yambda",
    version="0.2.0",
    description=("Two-tower next-track retrieval on the Yambda dataset with "
                 "TensorFlow Recommenders, exported for TF Serving."),
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=setuptools.find_packages(include=["tfrs_yambda*", "data_prep*",
                                               "export*"]),
    install_requires=[
        # scann 1.4.2's TF ops are built against TF 2.20: pin the minor.
        "tensorflow>=2.20,<2.21",
        "tf-keras>=2.20,<2.21",
        "tensorflow-recommenders==0.7.7",
        "scann==1.4.2",
        # TF Serving's protos (warmup file, models.config) and gRPC client;
        # 2.20.x is the release that leaves TF 2.20 and its protobuf alone.
        "tensorflow-serving-api>=2.20,<2.21",
        "tensorboard>=2.20,<2.21",
        "pandas>=2.0",
        "pyarrow>=14",
        "numpy>=1.26",
        "absl-py>=2.0",
        # eval/recall_at_k.png (Agg backend: no display needed).
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        # `ruff check .` (configuration: ruff.toml), run by .ci/run.
        "lint": ["ruff>=0.15,<0.18"],
        # benchmarks/ann_benchmark.py's HNSW rows (skipped without it).
        "benchmark": ["faiss-cpu>=1.8"],
        # data_prep's --prep_runner=spark (needs a Java runtime).
        "spark": ["pyspark>=3.5"],
    },
)
