"""The fused Triton kernels against the torch path, and their determinism across processes.

On the CPU the kernels run in Triton's interpreter, which has to be switched on before triton is imported: the
checks run in a process of their own (tests/fastblend_kernel_checks.py), never in this one. On a machine with CUDA
the same checks also run compiled on the GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsynth.fastblend import kernels

CHECKS_SCRIPT = Path(__file__).with_name("fastblend_kernel_checks.py")
CHECKS = ["check_remap", "check_patch_errors", "check_search_remap_error", "check_search_pairwise_error",
          "check_search_mean_error"]
NO_CUDA = "no CUDA device here: the compiled kernels' checks and GPU determinism need one (bench/fastblend_gpu.py)"


def run_checks(device, *more):
    """The checks in one new process and the unit's hash alone in another (and any `more` runs), all started at
    once (the imports of torch and triton are much of each one's time). Returns their reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(kernels.BACKEND_ENV, None)
    command = [sys.executable, str(CHECKS_SCRIPT), "--device", device]
    processes = [subprocess.Popen(command + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for extra in ([], ["--unit-only"], *more)]
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.fixture(scope="module")
def interpreted():
    """[checks, the unit again, every kernel compiled for sm_90 (an H100/H200) by Triton's ptxas]."""
    return run_checks("cpu", ["--compile-for", "90"])


@pytest.fixture(scope="module")
def on_cuda():
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return run_checks("cuda")


def test_the_checks_ran_in_the_interpreter(interpreted):
    assert all(report["interpreted"] is True for report in interpreted[:2])
    assert sorted(interpreted[0]["checks"]) == sorted(CHECKS)


@pytest.mark.parametrize("check", CHECKS)
def test_fused_kernel_equals_torch_path_on_exact_inputs(interpreted, check):
    assert interpreted[0]["checks"][check] == "ok"


def test_a_unit_recomputed_in_a_new_process_gives_the_same_bytes(interpreted):
    first, again, _ = interpreted
    assert again["unit_sha256"] == first["unit_sha256"]


def test_every_kernel_variant_compiles_for_the_gpu(interpreted):
    """What the interpreter runs, the compiler must accept: every kernel and step kind, to an sm_90 cubin."""
    compiled = interpreted[2]["compiled"]
    assert len(compiled) == 11 and sum(name.startswith("_search_kernel") for name in compiled) == 4


@pytest.mark.parametrize("check", CHECKS)
def test_compiled_kernel_equals_torch_path_on_cuda(on_cuda, check):
    assert on_cuda[0]["checks"][check] == "ok"


def test_cuda_units_recomputed_in_a_new_process_give_the_same_bytes(on_cuda):
    first, again = on_cuda
    assert again["unit_sha256"] == first["unit_sha256"]


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.backend_name("cpu") == "torch" and kernels.backend("cpu") is kernels
    assert kernels.backend_name("cuda") == "triton"
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    assert kernels.backend_name("cuda") == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.backend("cpu")
    monkeypatch.setenv(kernels.BACKEND_ENV, "cupy")
    with pytest.raises(ValueError, match="one of"):
        kernels.backend_name("cpu")


def test_gpu_benchmark_smoke_runs_ours_on_the_cpu(tmp_path):
    """bench/fastblend_gpu.py --cpu: ours at a tiny size, every mode, the JSON the GPU run fills in."""
    out = tmp_path / "fastblend_gpu.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "fastblend_gpu.py"
    result = subprocess.run([sys.executable, str(script), "--cpu", "--out", str(out)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(row["size"], row["mode"]) for row in report["rows"]] == [("40x32", "fast"), ("40x32", "balanced")]
    for row in report["rows"]:
        assert row["ours_fps"] > 0 and row["ours"]["kernels"] == "torch"
        assert row["original_fps"] is None and row["ratio"] is None and row["mae_vs_original"] is None


def test_the_kernel_back_end_is_in_the_smoothing_fingerprint(monkeypatch):
    """Fused and torch sums differ in their last bits: a cache smoothed by one is never reused by the other. The
    torch path keeps the fingerprint it had before the choice existed."""
    from types import SimpleNamespace

    from diffsynth.fastblend import FastBlendConfig
    from diffsynth.stages.smooth import SmoothStage

    stage = SimpleNamespace(config=FastBlendConfig(), device=torch.device("cpu"), shot_starts=[0])
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    torch_params = SmoothStage.params(stage)
    assert "kernels" not in torch_params
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    fused_params = SmoothStage.params(stage)
    assert fused_params["kernels"] == "triton" and fused_params != torch_params
