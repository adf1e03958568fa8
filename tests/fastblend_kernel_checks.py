"""Checks of the fused Triton kernels against the torch path, run in a process of their own
(tests/test_fastblend_kernels.py starts it): on the CPU the kernels run in Triton's interpreter, which must be
switched on before triton is imported, so this must never run inside the pytest process.

Every check uses tensors on which both paths are exact (integer-valued images small enough that every sum of
squares is an exact float32, style values multiples of every patch-voting count so that remaps stay integers):
there the two must agree bit for bit, NNFs and errors alike, whatever order they add in.

    python tests/fastblend_kernel_checks.py --device cpu|cuda [--unit-only]
    python tests/fastblend_kernel_checks.py --compile-for 90

prints one JSON object: {"checks": {name: "ok" or the failure}, "unit_sha256": ..., "seconds": ...}.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu")
parser.add_argument("--unit-only", action="store_true", help="only compute the smoothing units' hash")
parser.add_argument("--compile-for", metavar="SM", type=int,
                    help="only compile every kernel variant for CUDA compute capability SM (e.g. 90), no GPU needed")
args = parser.parse_args()
if args.device == "cpu" and not args.compile_for:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
os.environ["DIFFSYNTH_FASTBLEND_KERNELS"] = "triton"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffsynth.fastblend import FastBlendConfig, SmoothingPlan, kernels  # noqa: E402
from diffsynth.fastblend import triton_kernels as fused  # noqa: E402
from diffsynth.fastblend.patch_match import PatchMatchParams, estimate_nnf  # noqa: E402
from diffsynth.fastblend.runner import DictTables, ListFrames  # noqa: E402

torch.set_num_threads(1)
DEVICE = torch.device(args.device)


def integers(shape, high, seed, multiple=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, high, shape, generator=generator) * multiple).float().to(DEVICE)


def random_field(batch, height, width, seed):
    generator = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, height, (batch, height, width), generator=generator)
    xs = torch.randint(0, width, (batch, height, width), generator=generator)
    return torch.stack((ys, xs), dim=-1).int().to(DEVICE)


def same(name, ours, reference):
    assert ours.dtype == reference.dtype, f"{name}: dtype {ours.dtype} != {reference.dtype}"
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    if not torch.equal(ours, reference):
        differ = (ours != reference).reshape(-1)
        raise AssertionError(f"{name}: {int(differ.sum())} of {differ.numel()} values differ")


def check_remap():
    # Odd sizes and a field pointing everywhere: border clamping and partial patches at every edge.
    source = integers((2, 9, 11, 3), 256, 1)
    nnf = random_field(2, 9, 11, 2)
    for patch_size in (1, 3, 5):
        same(f"remap p={patch_size}", fused.remap(source, nnf, patch_size), kernels.remap(source, nnf, patch_size))


def check_patch_errors():
    for channels, patch_size in ((3, 3), (6, 5), (1, 3)):
        target, source = integers((2, 8, 7, channels), 16, 3), integers((2, 8, 7, channels), 16, 4)
        nnf_a, nnf_b = random_field(2, 8, 7, 5), random_field(2, 8, 7, 6)
        same(f"patch_error C={channels} p={patch_size}", fused.patch_error(target, source, nnf_a, patch_size),
             kernels.patch_error(target, source, nnf_a, patch_size))
        same(f"pairwise C={channels} p={patch_size}",
             fused.pairwise_patch_error(target, nnf_a, source, nnf_b, patch_size),
             kernels.pairwise_patch_error(target, nnf_a, source, nnf_b, patch_size))


def estimate_both(style_error, params, batch, size, style_multiple, seed):
    """estimate_nnf with the fused kernels and with the torch path on the same exact inputs; the warp too."""
    height, width = size
    # Few distinct values: many candidates tie, so keeping only strictly lower errors is checked too.
    source_guide = integers((batch, height, width, 3), 2, seed)
    target_guide = integers((height, width, 3), 2, seed + 1)
    source_style = integers((batch, height, width, 3), 2, seed + 2, multiple=style_multiple)
    results = {}
    for name in kernels.BACKENDS:
        os.environ["DIFFSYNTH_FASTBLEND_KERNELS"] = name
        nnf = estimate_nnf(source_guide, target_guide, source_style, style_error, params, seed=seed)
        results[name] = nnf, kernels.backend(DEVICE).remap(source_style, nnf, params.patch_sizes()[-1])
    os.environ["DIFFSYNTH_FASTBLEND_KERNELS"] = "triton"
    (fused_nnf, fused_warp), (torch_nnf, torch_warp) = results["triton"], results["torch"]
    same(f"{style_error} NNF", fused_nnf, torch_nnf)
    same(f"{style_error} warp", fused_warp, torch_warp)
    return fused_nnf


def check_search_remap_error():
    # Patch 3 only: style values multiples of 36 (every count of a 3×3 vote: 4, 6, 9) keep the remapped target
    # style an integer; guide_weight 4 makes sqrt(w) = 2 exact. Random start and tracking: every search step runs.
    params = PatchMatchParams(minimum_patch_size=3, num_iter=1, guide_weight=4.0, initialize="random",
                              tracking_window_size=1)
    nnf = estimate_both("remap", params, batch=4, size=(11, 16), style_multiple=36, seed=7)
    assert nnf.dtype == torch.int32


def check_search_pairwise_error():
    # The default guide weight: the pairwise error never divides, so integers stay exact. (Patch 3: the kernels'
    # patch loop is the same code for every size, checked at 5 by check_patch_errors; the interpreter pays per op.)
    params = PatchMatchParams(minimum_patch_size=3, num_iter=1, guide_weight=10.0, initialize="random",
                              tracking_window_size=1)
    estimate_both("pairwise", params, batch=4, size=(11, 16), style_multiple=1, seed=8)


def check_search_mean_error():
    # The accurate mode's mean of remaps: multiples of 72 stay integers through a 3×3 vote and a mean of 2.
    params = PatchMatchParams(minimum_patch_size=3, num_iter=1, guide_weight=4.0)
    estimate_both("mean", params, batch=2, size=(11, 16), style_multiple=72, seed=9)


def unit_sha256(large: bool):
    """The bytes of smoothing units computed with the fused kernels, hashed (non-integer frames: the order of every
    addition counts). Small (the interpreter): one balanced-mode frame, two sources in one batch, patch 3. Large
    (a GPU): every unit of a fast-mode smoothing at 96×128 with the default patch sizes (3 levels)."""
    generator = torch.Generator().manual_seed(0)
    num_frames, size = (3, (8, 9)) if not large else (6, (96, 128))
    guide = [(torch.rand(*size, 3, generator=generator) * 255).round() for _ in range(num_frames)]
    style = [(g * 0.5 + torch.rand(*size, 3, generator=generator) * 60) for g in guide]
    if large:
        config = FastBlendConfig(inference_mode="fast", window_size=3, batch_size=4)
    else:
        config = FastBlendConfig(inference_mode="balanced", window_size=1, batch_size=2, minimum_patch_size=3,
                                 num_iter=1)
    plan = SmoothingPlan(num_frames, config, device=DEVICE)
    frames, tables = ListFrames(guide, style, DEVICE), DictTables()
    keys = plan.unit_keys() if large else ["frame/000001"]
    digest = hashlib.sha256()
    for key in keys:
        result = plan.compute(key, frames, tables)
        if not key.startswith("frame/"):
            tables.put(key, result)
        digest.update(key.encode() + result.cpu().numpy().tobytes())
    return digest.hexdigest()


def compile_all(capability):
    """Compile every kernel and every step kind to a cubin for `capability` (Triton's own ptxas, no GPU): what the
    interpreter accepts but the compiler would not is caught here. Returns the kernel variants compiled."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {"guide_scale", "guide_weight"}
    variants = [(fused._remap_kernel, dict(C=3, CP=4)), (fused._patch_error_kernel, dict(A_AT_NNF=True, C=6, CP=8)),
                (fused._patch_error_kernel, dict(A_AT_NNF=False, C=3, CP=4))]
    for kind in (fused.EVALUATE, fused.NEIGHBOUR, fused.RANDOM, fused.BATCH):
        variants += [(fused._search_kernel, dict(KIND=kind, C=3, CP=4)),
                     (fused._pair_search_kernel, dict(KIND=kind, C=3, CP=4))]
    compiled = []
    for kernel, constants in variants:
        constants = {**constants, "R": 1, "BLOCK": 128}
        signature = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constants:
                signature[name] = "constexpr"
            elif name in ("nnf", "nnf_a", "nnf_b", "nnf_in", "nnf_out", "offsets"):
                signature[name] = "*i32"
            elif name in floats:
                signature[name] = "fp32"
            elif name in ("H", "W", "B", "N", "PAIRS", "dy", "dx", "step", "rounds"):
                signature[name] = "i32"
            else:
                signature[name] = "*fp32"
        binary = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                target=GPUTarget("cuda", capability, 32))
        assert binary.asm.get("cubin"), f"{kernel.fn.__name__}: no cubin"
        compiled.append(f"{kernel.fn.__name__}{constants}")
    return compiled


CHECKS = [check_remap, check_patch_errors, check_search_remap_error, check_search_pairwise_error,
          check_search_mean_error]

if __name__ == "__main__":
    started = time.perf_counter()
    if args.compile_for:
        compiled = compile_all(args.compile_for)
        print(json.dumps({"compiled": compiled, "seconds": round(time.perf_counter() - started, 2)}))
        sys.exit(0)
    report = {"checks": {}, "interpreted": fused.INTERPRETED}
    for check in [] if args.unit_only else CHECKS:
        try:
            check()
            report["checks"][check.__name__] = "ok"
        except Exception as error:  # reported per check, so one failure does not hide the others
            report["checks"][check.__name__] = "".join(traceback.format_exception_only(error)).strip()
    report["unit_sha256"] = unit_sha256(large=DEVICE.type == "cuda")
    report["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(report))
