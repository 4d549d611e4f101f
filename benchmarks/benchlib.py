"""Shared pieces of the benchmark scripts: the machine, the plain reference loop, and
running a command while measuring its wall time and peak memory.

Every script measures tlearn and its baseline in ONE run on the same images and prints
ratios; absolute times are not comparable between runs on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Import this checkout's tlearn, not whichever one is installed.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def child_env(**extra: str) -> dict:
    # This checkout first; keep what PYTHONPATH already held (packages installed elsewhere).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.update(extra)
    return env


def list_images(folder: str | Path) -> list[str]:
    """Image files under `folder`, sorted by path (hidden files left out)."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            out.append(str(p))
    return out


# ----------------------------------------------------------------------------- machine


def machine() -> dict:
    """Cores, CPU model, vector flags and a rough fp32 peak (cores x GHz x FLOP/cycle)."""
    info = {"cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    info["cpu"] = m.group(1).strip() if m else platform.processor() or "?"
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16"]
    info["flags"] = [f for f in wanted if f in flags]
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    ghz = float(m.group(1)) / 1000 if m else None
    info["ghz"] = round(ghz, 2) if ghz else None
    # fp32 FLOP per cycle per core: 2 FMA pipes x vector lanes x 2. AVX-512 on AMD Zen 4 runs
    # on 256-bit pipes, so it counts like AVX2; Intel server cores have two 512-bit pipes.
    intel512 = "avx512f" in flags and "GenuineIntel" in text
    per_cycle = 64 if intel512 else 32 if {"avx2", "fma"} <= flags else 16
    info["flop_per_cycle"] = per_cycle
    info["peak_gflops"] = round(info["cores"] * ghz * per_cycle, 1) if ghz else None
    try:
        import onnxruntime
        import timm
        import torch

        info["torch"] = torch.__version__
        info["timm"] = timm.__version__
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def print_machine(info: dict) -> None:
    print(
        f"machine: {info['cores']} cores, {info['cpu']}, {info.get('ghz')} GHz, "
        f"flags {' '.join(info['flags'])}; rough fp32 peak {info.get('peak_gflops')} GFLOP/s "
        f"({info['flop_per_cycle']} FLOP/cycle/core); torch {info.get('torch')}, "
        f"onnxruntime {info.get('onnxruntime')}, timm {info.get('timm')}"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average at start: {load:.2f} (other work on the machine skews absolute times)")


# ----------------------------------------------------------------------------- plain loop


def plain_loop(paths: list[str], batch_size: int = 32, model_name: str = "tf_efficientnet_lite0"):
    """What a user writes without tlearn: timm model with the same bundled weights, PIL open
    + convert("RGB") + timm's eval transform per image, torch.stack batches, forward under
    torch.no_grad with default torch threads. Returns the (N, D) pooled features."""
    import timm
    import torch
    from PIL import Image

    from tlearn.backbone.weights import load_backbone

    model = load_backbone(model_name, "auto").model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    feats = []
    for i in range(0, len(paths), batch_size):
        batch = [transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]]
        with torch.no_grad():
            x = torch.stack(batch)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(feats).numpy()


# ----------------------------------------------------------------------------- processes


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants, in KiB (Linux /proc)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Run `cmd`; wall seconds, peak RSS of its main process (wait4 ru_maxrss), the peak of
    the sampled total RSS of its process tree, exit code, stdout and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd or REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_tree = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_tree[0] = max(peak_tree[0], _tree_rss_kib(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    t_out.start()
    t_err.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    t_out.join()
    t_err.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * (1 if sys.platform != "darwin" else 1 / 1024)
    return {
        "wall": wall,
        "rc": proc.returncode,
        "peak_rss_mib": rss / 1024,
        "peak_tree_rss_mib": peak_tree[0] / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "stdout": "".join(out_chunks),
        "stderr": "".join(err_chunks),
    }


def check(res: dict, what: str) -> dict:
    if res["rc"] != 0:
        sys.stderr.write(res["stderr"][-3000:])
        raise SystemExit(f"{what} failed with exit code {res['rc']}")
    return res


def child_json(res: dict) -> dict:
    """The last line of a child's stdout, as JSON."""
    return json.loads(res["stdout"].strip().splitlines()[-1])


def median(values) -> float:
    return statistics.median(values)


def tlearn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlearn", *args]
