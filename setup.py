from setuptools import find_packages, setup

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
    entry_points={"console_scripts": ["natlb = natlb.cli:main"]},
)
