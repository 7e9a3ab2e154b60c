from setuptools import find_packages, setup

setup(
    name="scaletrain",
    version="0.1.0",
    description="Train decoder-only, encoder-only and encoder-decoder transformers from a laptop CPU to GPU clusters.",
    packages=find_packages(include=["scaletrain", "scaletrain.*"]),
    package_data={"scaletrain": ["configs/*.yaml", "configs/*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13,<2.14",
        "hydra-core>=1.3.2",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "wandb>=0.18",
        "tqdm>=4.66",
        "scipy>=1.11",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "transformers>=4.45",
            "datasets>=2.19",  # the parquet / saved-dataset corpus readers are tested (and the prepare benchmark)
            "zstandard>=0.22",  # .zst corpus files are tested
            "triton>=3.1; platform_system=='Linux'",
            "submitit>=1.5",
            "hydra-submitit-launcher>=1.2",
            "deepspeed>=0.19",  # parallel.engine=deepspeed is tested against the native engine
        ],
        "slurm": ["submitit>=1.5", "hydra-submitit-launcher>=1.2"],
        "zstd": ["zstandard>=0.22"],  # reading .zst corpus files in scaletrain data prepare
        "deepspeed": ["deepspeed>=0.19"],  # parallel.engine=deepspeed (issue 19; runs on CPU with gloo)
    },
    entry_points={"console_scripts": ["scaletrain=scaletrain.cli:main"]},
)
