"""Builds kvq_torch, kvq's operations as PyTorch custom ops, against this repository's include/.

    cd examples/torch && TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace

needs torch (with CUDA) and nvcc; TORCH_CUDA_ARCH_LIST picks the GPUs (default: the visible one's).
"""
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
KVQ_INCLUDE = os.path.normpath(os.path.join(HERE, "..", "..", "include"))

setup(
    name="kvq_torch",
    version="0.1.0",
    description="kvq's INT8 KV-cache quantization, paged cache and decode attention as torch custom ops",
    packages=["kvq_torch"],
    ext_modules=[
        CUDAExtension(
            "kvq_torch._C",
            ["csrc/module.cpp", "csrc/dense_ops.cu", "csrc/paged_ops.cu"],
            include_dirs=[KVQ_INCLUDE, os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
