"""diffusers-afm: Adversarial Flow Models for Hugging Face diffusers."""

from setuptools import find_packages, setup

# torch is pinned loosely; install the CPU or CUDA build you want first (see README).
install_requires = [
    "torch>=2.4",
    "diffusers>=0.42.1",
    "transformers>=4.46",
    "accelerate>=1.0",
    "datasets>=3.0",
    "huggingface-hub>=0.34",
    "safetensors>=0.4",
    "numpy",
    "tqdm",
    "Pillow",
]
extras = {
    # the example trainers: logging, the embedded digits data set, LoRA adapters (diffusers' LoRA backend)
    "training": ["tensorboard", "scikit-learn", "peft>=0.17"],  # peft: LoRA post-training (--lora_rank)
    # metrics: exact optimal transport for the toy suite, figures; torch-fidelity pulls torchvision
    # (see docs/ENVIRONMENT notes in the README), so it is its own extra.
    "evaluation": ["scipy", "POT", "matplotlib", "scikit-learn"],
    "fid": ["torch-fidelity"],
    "wandb": ["wandb"],
}
extras["dev"] = sorted(set(extras["training"] + extras["evaluation"] + ["pytest", "pytest-timeout"]))

setup(
    name="diffusers-afm",
    version="0.1.0",
    description="Adversarial Flow Models (one-step class-conditional generators) for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_afm": ["data/*.json"]},
    python_requires=">=3.9",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "afm-convert=diffusers_afm.conversion.cli:main",
        ]
    },
)
