# Build step for STI's optional C kernels. Everything else is declared in pyproject.toml.
# The extension is optional: if no C compiler is present the package installs and runs on
# its NumPy fallback, which computes the same results.
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: keep the NumPy path
            print(f"warning: STI C kernels not built ({exc}); using the NumPy fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"warning: {ext.name} not built ({exc}); using the NumPy fallback")


setup(
    ext_modules=[
        # Vectorised transcendental functions (GELU's erf) through glibc's libmvec. The build is
        # for this machine's CPU: STI compiles its kernels where it is installed.
        Extension(
            "sti._fastmath",
            sources=["sti/_fastmath.c"],
            depends=["sti/_parallel.h"],
            extra_compile_args=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
            libraries=["mvec", "m"],
        ),
        # Dequantisation of packed k-bit weight codes (sti/quant.py). No fast-math and no FMA
        # contraction: its output must be bit-identical to the NumPy reference.
        Extension(
            "sti._kernels",
            sources=["sti/_kernels.c"],
            extra_compile_args=["-O3", "-march=native", "-ffp-contract=off"],
        ),
        # Fused low-bit matrix-vector products and dequantization (sti/lowbit.py), on a small
        # pthread pool. -ffp-contract=off keeps its dequantization bit-identical to the NumPy
        # references (the dot products use explicit FMA intrinsics).
        Extension(
            "sti._lowbit",
            sources=["sti/_lowbit.c"],
            depends=["sti/_parallel.h"],
            extra_compile_args=["-O3", "-march=native", "-ffp-contract=off", "-pthread"],
            extra_link_args=["-pthread"],
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
