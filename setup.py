from setuptools import setup

setup(
    name="tinydeeplab",
    version="0.1.0",
    description="DeepLab v2 rebuilt by hand: atrous convolution kernels, autograd, dense CRF",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The top-level kernels/ folder installs as tinydeeplab.kernels: a top-level package named
    # "kernels" would clash with the unrelated PyPI distribution of that name.
    # benchmarks/ installs as tinydeeplab.benchmarks so that `tinydeeplab bench` works anywhere.
    packages=["tinydeeplab", "tinydeeplab.kernels", "tinydeeplab.kernels.permutohedral",
              "tinydeeplab.benchmarks"],
    package_dir={"tinydeeplab": "tinydeeplab", "tinydeeplab.kernels": "kernels",
                 "tinydeeplab.kernels.permutohedral": "kernels/permutohedral",
                 "tinydeeplab.benchmarks": "benchmarks"},
    install_requires=["numpy", "numba", "numba-cuda", "pillow", "matplotlib", "tqdm",
                      "threadpoolctl",
                      # Numba's TBB threading layer (tinydeeplab/_threads.py); optional elsewhere
                      "tbb>=2021.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "test": ["pytest", "hypothesis", "torch", "pydensecrf2",
                 # NVRTC, so that tests/test_cuda_compiles.py can compile every CUDA kernel
                 # with the real compiler on machines without a GPU (NVVM: the CUDA toolkit)
                 "nvidia-cuda-nvrtc-cu12; platform_system == 'Linux'"],
    },
    package_data={"tinydeeplab.benchmarks": ["*.json"],  # recorded results lessons read
                  "tinydeeplab": ["photos/*"]},  # the photograph lesson 08 uses
    entry_points={"console_scripts": ["tinydeeplab = tinydeeplab.cli:main"]},
)
