"""Build and install vpt_fast (see README.md for the supported install command)."""
from setuptools import find_packages, setup

setup(
    name="vpt_fast",
    version="0.1.0",
    description="Fast, memory-lean Visual Prompt Tuning (VPT) kernels for timm ViT and Swin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vpt_fast", "vpt_fast.*"]) + ["vpt_fast.kernels"],
    package_dir={"vpt_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "timm>=1.0", "numpy", "safetensors", "ninja"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["vpt-fast=vpt_fast.cli:main"]},
)
