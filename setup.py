"""Ships the CUDA sources of kernels/ inside the package (as distrib/kernels/).

Everything else about the build is in pyproject.toml. In a source tree the
kernels are read from kernels/ directly; an installed wheel has no source
tree, so the build copies them next to the package.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNELS = Path(__file__).parent / "kernels"


class build_py_with_kernels(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "distrib" / "kernels"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(KERNELS.glob("*.cu*")):
            self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": build_py_with_kernels})
