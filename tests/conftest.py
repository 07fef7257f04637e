import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine with -m gpu)")
    config.addinivalue_line("markers", "slow: real-model tests that take a minute or more on 2 CPU cores")
