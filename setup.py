"""Install the model-compression framework: packages amc, graph, compressors, trainers."""
from setuptools import find_packages, setup

setup(
    name="amc-compress",
    version="0.1.0",
    description="Capture any PyTorch network as an exact, prunable graph; structured pruning with dependency analysis",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["amc", "amc.*", "graph", "graph.*", "compressors", "compressors.*",
                                    "trainers", "trainers.*"]),
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "networkx>=3.0",
        "graphviz>=0.20",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "torchvision<=0.29.1", "onnx", "onnxruntime", "onnxscript", "hypothesis", "timm>=1.0"],
        "hf": ["transformers>=4.45"],
        "bench": ["torch-pruning>=1.6,<1.7", "torchvision<=0.29.1", "onnx", "onnxruntime", "onnxscript",
                  "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["amc=amc.cli:main"]},
)
