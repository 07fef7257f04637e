"""What the benchmarks share: the copy bandwidth their byte rates are compared against, and writing a result."""
import json
import time
from pathlib import Path

import torch


def copy_bandwidth(device="cuda", n_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Copy bandwidth within the device in GB/s (bytes read plus bytes written), median of `repeats` copies of an
    n_bytes buffer after a warm-up copy: the most a decode step that reads its bytes once can reach."""
    device = torch.device(device)
    src = torch.ones(n_bytes, dtype=torch.uint8, device=device)  # touched, so the CPU's pages are really read
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n_bytes / sorted(times)[repeats // 2] / 1e9


def write_result(result: dict, path: Path, plot=None) -> None:
    """result as JSON at path (its folder made if missing), replaced whole (a run stopped mid-write leaves the
    previous file, never half of one), then plot(result, png_path) beside it when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    if plot is not None:
        plot(result, path.with_suffix(".png"))
