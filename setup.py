from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class BuildWithBpf(build_ext):
    """The C core (cffi), then the tc fast path's BPF object next to it."""

    def run(self) -> None:
        super().run()
        import importlib.util
        spec = importlib.util.spec_from_file_location("natlb_build", "natlb/_build.py")
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        out = Path(self.get_ext_fullpath("natlb._natlb_core")).parent
        out.mkdir(parents=True, exist_ok=True)
        build.build_bpf(out)


setup(
    name="natlb",
    version="0.1.0",
    description="Userspace packet-rewriting NAT load balancer (NFQUEUE, C data path)",
    packages=find_packages(include=["natlb", "natlb.*", "natlb_testbed"]),
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "pyroute2>=0.7", "prometheus-client>=0.20"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scapy", "netfilterqueue", "hypothesis", "ruff"],
    },
    cffi_modules=["natlb/_build.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithBpf},
    entry_points={"console_scripts": ["natlb = natlb.cli:main"]},
)
