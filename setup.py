"""Packaging for keras_seltransfer."""

import os
import re

from setuptools import find_packages
from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "keras_seltransfer", "__init__.py")) as f:
    version = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
with open(os.path.join(here, "README.md")) as f:
    long_description = f.read()

APPS = ("pretrain", "finetune", "evaluate", "export", "build_index", "compare", "data_service")

setup(
    name="keras_seltransfer",
    version=version,
    description="Selective transfer learning for small image data sets, as Keras 3 building blocks.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_seltransfer", "keras_seltransfer.*"]),
    # TensorFlow itself comes from an extra: `cpu` (tensorflow-cpu) or `gpu`
    # (tensorflow with the CUDA libraries); the two wheels must not be mixed.
    install_requires=[
        "keras>=3.5",
        "tensorflow-datasets>=4.9",
        "scikit-learn>=1.3",
        "numpy>=1.26",
        "absl-py>=2.0",
        "pillow>=10.0",
        "tensorboard>=2.16",
        "importlib_resources>=6.0",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        # The ELPV solar-cell images (CC BY-NC-SA 4.0), the default target data,
        # and scikit-image, whose wheel holds the brick/grass/gravel texture
        # photographs (CC0) of the `textures` target.
        "data": ["elpv-dataset>=1.0", "scikit-image>=0.19"],
        # Plots of the benchmark and results tools (tools/).
        "plots": ["matplotlib>=3.7"],
        "dev": [
            "pytest>=8.0",
            "pytest-xdist>=3.0",
            "elpv-dataset>=1.0",
            "scikit-image>=0.19",
            "matplotlib>=3.7",
        ],
        # KerasHub backbones (`kerashub:<preset>`, the backbone zoo test). Its
        # tensorflow-text requirement pulls in the full `tensorflow` package
        # beside `tensorflow-cpu`; tools/setup_env.sh installs it for the
        # tests without that dependency, which only its text models need.
        "hub": ["keras-hub>=0.32"],
    },
    entry_points={
        "console_scripts": [
            f"kst-{name.replace('_', '-')} = keras_seltransfer.apps.{name}:run" for name in APPS
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
