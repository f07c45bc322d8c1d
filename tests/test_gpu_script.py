"""``benchmarks/gpu.py --cpu-smoke`` runs in the suite, without AnnData/SpatialData/geoopt (as on the GPU image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("anndata", "scanpy", "spatialdata", "spatialdata_plot", "squidpy", "geoopt")


@pytest.mark.slow
def test_gpu_script_cpu_smoke_runs_without_the_scverse_stack(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "smoke.json"
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in ABSENT)
    code = (f"import runpy, sys; {block}; sys.argv = ['gpu.py', '--cpu-smoke', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu.py')!r}, run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    lora, pred = report["lora_training"], report["prediction"]
    assert lora["backbone"] == "test_vit"
    assert lora["spots"] == 16
    assert lora["train_spots_per_s"] > 0
    assert 0 <= lora["data_wait_fraction"] <= 1
    assert lora["params_trainable_m"] < lora["params_total_m"]  # only the adapters and heads train
    assert pred["spots"] == 16
    assert pred["spots_per_s"] > 0
    assert report["gpu_tests"]["returncode"] in (0, 5), report["gpu_tests"]  # 5: all skipped/deselected
    assert "skipped" in report["gpu_tests"]["summary"]  # no CUDA here: the GPU tests skip, but they are collected
