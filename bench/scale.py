"""Many workers: does the Ray executor scale? Two measurements.

`simulated` — the executor, the coordinator and the data path at real sizes, without the model. A simulated
denoising run at 1280×768 (latents (4, 96, 160) float32, two conditioning maps per frame of a natural frame's cached
size, each window's ε (16, 4, 96, 160)), with the UNet + ControlNet call replaced by a fixed-duration sleep per
window (`--window-s`, 0.5 s), runs on N = 1, 2, 4, 8 Ray workers on this machine. The stages are the real
executor's units: conditioning frames made on the coordinator (as the crop stage is), a second map per frame made
on a worker (as annotation is), initial latents per frame, then per step one unit per sliding window (reads its
frames' latents and maps, writes ε) and one per frame (tent-weighted mean of its windows' ε with the pipeline's own
`combine_window_eps`, then the DDIM step). ControlNet reuse is modelled as the real `ControlNetResiduals` does it
with group = stride: a window evaluates the frames the previous window it computed on the same worker did not.
The run folder is on /dev/shm by default (`--folder`): its fsyncs cost nothing there, so the figure is the executor's,
not this shared VM disk's (the coordinator's measured commit time is printed too).

The conditioning frames, their second maps and the initial latents are made in a first pass on the same workers,
not timed (as `real` reuses them from a base run); `--fill-in-span` makes them in the timed pass, as a render from
scratch does: the head node makes the frames in order, so the last block's first windows start late.

Prints per N: the denoising span (first window dispatched → last step unit committed), the speed-up against one
Ray worker, the coordinator's CPU share (its process CPU time over the span's wall time), the bytes sent to and from
the workers per step against the minimum (each latent in once and out once per step and each window's ε out once;
the maps once per render), ControlNet evaluations per frame per step, and the coordinator's milliseconds per unit.
Exits 1 if 8 workers are below --target (7×) or the bytes per step above 1.5× the minimum.

`real` — the tiny demo models on the CPU: the denoising stages of a render (2 ControlNets, 2 steps) in the render
process and on 2 Ray workers (the other stages reused from a base run), each process on one torch thread, twice
each, alternating (medians); the outputs must be byte-identical. Timed from the first window's commit (so the
workers' model loading, on their first unit, is left out) to the last denoising unit's commit.

    python bench/scale.py simulated [--workers 1 2 4 8] [--frames 264] [--steps 10] [--window-s 0.5]
    python bench/scale.py real [--frames 40] [--size 64]
"""

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffsynth.cache import RunCache, tensors_to_bytes  # noqa: E402
from diffsynth.config import ExecutorConfig  # noqa: E402
from diffsynth.executor import RayExecutor  # noqa: E402
from diffsynth.runner import run_stages  # noqa: E402
from diffsynth.schedule import ddim_step, sliding_windows, windows_containing  # noqa: E402
from diffsynth.stages.base import Stage, frame_index, frame_key  # noqa: E402
from diffsynth.stages.denoise import combine_window_eps  # noqa: E402

RESULTS = REPO / "bench" / "results"
LATENT_SHAPE = (4, 96, 160)   # 1280×768 / 8
MAP_BYTES = 1_400_000         # a natural 1280×768 frame in the cache's lossless codec: 1.1–1.7 MB
WINDOW, STRIDE = 16, 8


# --- the simulated render's stages -----------------------------------------------------------------------------
class SimMaps(Stage):
    """Conditioning maps per frame. on_coordinator=True: made in the render process, as the crop stage's frames
    are; False: made on a worker from the first maps, as annotation is."""

    def __init__(self, ctx, name, num_frames, source=None):
        super().__init__(ctx, [source] if source else [])
        self.name, self.num_frames, self.source = name, num_frames, source
        self.on_coordinator = source is None

    def unit_keys(self):
        return [frame_key(i) for i in range(self.num_frames)]

    def compute(self, key):
        if self.source is not None:
            return np.frombuffer(self.read_bytes(self.source, key), dtype=np.uint8)[::-1].tobytes(), None
        rng = np.random.default_rng(frame_index(key))
        return rng.integers(0, 256, MAP_BYTES, dtype=np.uint8).tobytes(), None


class SimLatents(Stage):
    def __init__(self, ctx, num_frames):
        super().__init__(ctx)
        self.name, self.num_frames = "sim.latents", num_frames

    def unit_keys(self):
        return [frame_key(i) for i in range(self.num_frames)]

    def compute(self, key):
        generator = torch.Generator().manual_seed(frame_index(key))
        return tensors_to_bytes({"latent": torch.randn(LATENT_SHAPE, generator=generator)}), None


class SimWindows(Stage):
    """One unit per sliding window: reads the window's latents and both maps of its frames, sleeps `window_s` (the
    model), writes an ε made from the latents and the maps (so it depends on every byte it reads)."""
    ephemeral = True
    runs_in_order = True  # as the real windows: ControlNet residuals reused from the window before

    def __init__(self, ctx, step, latents, maps, window_s):
        super().__init__(ctx, [latents, *maps])
        self.name = f"sim.{step:03d}.windows"
        self.latents, self.maps, self.window_s = latents, maps, window_s
        self.windows = sliding_windows(latents.num_frames, WINDOW, STRIDE)
        self.last_window = None  # the previous window this process computed (ControlNet reuse, as the real one)

    def window_key(self, j):
        return f"w{j:05d}.safetensors"

    def unit_keys(self):
        return [self.window_key(j) for j in range(len(self.windows))]

    def reads(self, key):
        start, end = self.windows[int(key[1:6])]
        frames = [frame_key(i) for i in range(start, end)]
        return [(source, k) for source in [self.latents, *self.maps] for k in frames]

    def compute(self, key):
        j = int(key[1:6])
        start, end = self.windows[j]
        # (A worker's block runs backwards every other step: the window before is then j + 1.)
        reused = set(range(*self.windows[self.last_window])) if self.last_window in (j - 1, j + 1) else set()
        self.counts["controlnet_frame_evaluations"] = (self.counts.get("controlnet_frame_evaluations", 0)
                                                       + len(set(range(start, end)) - reused))
        self.last_window = j
        latents = torch.stack([self.read_tensors(self.latents, frame_key(i))["latent"] for i in range(start, end)])
        condition = [sum(self.read_bytes(m, frame_key(i))[0] for m in self.maps) for i in range(start, end)]
        time.sleep(self.window_s)
        # In place: the model's stand-in does no more CPU work than making ε from what it read (on a GPU host that
        # is the device's work, not the host's; here it would compete with the executor for the cores).
        eps = latents.mul_(0.5).add_(torch.tensor(condition, dtype=torch.float32).view(-1, 1, 1, 1) / 512)
        return tensors_to_bytes({"eps": eps}), None


class SimStep(Stage):
    """One unit per frame: the tent-weighted mean of its windows' ε, then the DDIM step."""
    ephemeral = True
    model_free = True  # as the real one without in-loop smoothing

    def __init__(self, ctx, step, latents, windows):
        super().__init__(ctx, [latents, windows])
        self.name = f"sim.{step:03d}.step"
        self.latents, self.windows_stage = latents, windows
        self.num_frames = latents.num_frames
        self.ephemeral = True

    def unit_keys(self):
        return [frame_key(i) for i in range(self.num_frames)]

    def reads(self, key):
        index = frame_index(key)
        return [(self.latents, key)] + [(self.windows_stage, self.windows_stage.window_key(j))
                                        for j in windows_containing(index, self.windows_stage.windows)]

    def compute(self, key):
        index = frame_index(key)
        x_t = self.read_tensors(self.latents, key)["latent"]
        eps = combine_window_eps(index, self.windows_stage.windows, self._window_eps)
        return tensors_to_bytes({"latent": ddim_step(x_t, eps, 0.5, 0.7)}), None

    def _window_eps(self, j):
        """Each window's ε parsed once for the consecutive frames sharing it (as the pipeline's CombinedEps)."""
        recent = self.__dict__.setdefault("recent", OrderedDict())
        if j not in recent:
            recent[j] = self.read_tensors(self.windows_stage, self.windows_stage.window_key(j))["eps"]
            while len(recent) > WINDOW // STRIDE + 1:
                recent.popitem(last=False)
        return recent[j]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "recent"}


def sim_stages(ctx, num_frames, steps, window_s):
    frames = SimMaps(ctx, "sim.frames", num_frames)
    edges = SimMaps(ctx, "sim.edges", num_frames, source=frames)
    latents = SimLatents(ctx, num_frames)
    latents.num_frames = num_frames
    stages = [frames, edges, latents]
    for step in range(steps):
        windows = SimWindows(ctx, step, latents, [frames, edges], window_s)
        latents_next = SimStep(ctx, step, latents, windows)
        stages += [windows, latents_next]
        latents = latents_next
    stages[-1].ephemeral = False
    return stages


class SimContext:
    def __init__(self, cache):
        self.cache = cache

    def __getstate__(self):
        return {"cache": None}


def simulate(workers, args, folder):
    run_dir = folder / f"sim{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cache = RunCache(run_dir)
    cache.lock()
    ctx = SimContext(cache)
    stages = sim_stages(ctx, args.frames, args.steps, args.window_s)
    settings = ExecutorConfig(workers=workers, cpus_per_worker=1)
    with RayExecutor(settings, "cpu", stages) as executor:
        # The actors have started (they import and unpickle the stages) before anything is timed.
        executor.ray.get([actor.pid.remote() for actor in executor.actors])
        if not args.fill_in_span:
            # The conditioning frames, their second maps and the initial latents first, as `real` reuses them from
            # a base run: the span is the denoising's. Made in the same pass, as a render from scratch does, the
            # head node's in-order decoding starts each block's first windows when their frames exist, and the last
            # block, once late, stays late (each block waits on its neighbours' windows every step).
            run_stages(stages[:3], cache, progress=False, executor=executor)
        cpu_before, wall_before = os.times(), time.time()
        report = run_stages(stages, cache, progress=False, executor=executor)
        cpu_after, wall_after = os.times(), time.time()
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    first = db.execute("SELECT MIN(finished) FROM units WHERE stage LIKE 'sim.%.windows'").fetchone()[0]
    last = db.execute("SELECT MAX(finished) FROM units WHERE stage LIKE 'sim.%.step'").fetchone()[0]
    final = sorted(db.execute("SELECT key, checksum FROM units WHERE stage = ?", (stages[-1].name,)).fetchall())
    db.close()
    cache.close()
    counts = report.executor
    span = last - first + args.window_s  # the first window was dispatched one window's time before its commit
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    latent = len(tensors_to_bytes({"latent": torch.zeros(LATENT_SHAPE)}))
    windows = len(stages[3].windows)
    eps = len(tensors_to_bytes({"eps": torch.zeros((WINDOW, *LATENT_SHAPE))}))
    minimum_step = 2 * args.frames * latent + windows * eps
    minimum_maps = args.frames * MAP_BYTES  # the frames' maps once (the edges are made on the workers)
    denoise = [s.name for s in stages[3:]]
    to_step = sum(counts["bytes_to_workers_by_stage"].get(n, 0) for n in denoise) / args.steps
    from_step = sum(counts["bytes_from_workers_by_stage"].get(n, 0) for n in denoise) / args.steps
    committed = max(1, report.units_computed)
    return {
        "workers": workers, "span_s": round(span, 2), "whole_s": round(wall_after - wall_before, 2),
        "coordinator_cpu_s": round(cpu, 2), "coordinator_cpu_share": round(cpu / (wall_after - wall_before), 3),
        "bytes_to_workers_per_step": int(to_step), "bytes_from_workers_per_step": int(from_step),
        "bytes_per_step": int(to_step + from_step), "minimum_bytes_per_step": minimum_step,
        "bytes_per_step_vs_minimum": round((to_step + from_step) / minimum_step, 3),
        "bytes_to_workers": counts["bytes_to_workers"], "bytes_to_workers_minimum": minimum_maps,
        "controlnet_evaluations_per_frame_step": round(
            counts["controlnet_frame_evaluations"] / (args.frames * args.steps), 3),
        "coordinator_ms_per_unit": {k: round(1000 * v / committed, 2) for k, v in counts["coordinator_s"].items()},
        "worker_busy_s_by_stage": busy_by_stage(counts["busy_s"]),
        "units": report.units_computed, "units_dispatched": counts["units_dispatched"],
        "tasks_dispatched": counts["tasks_dispatched"],
        "units_resent": counts["units_resent"], "units_taken": counts.get("units_taken"),
        "units_out_of_order": counts.get("units_out_of_order"),
        "units_taken_by_stage": busy_by_stage({0: counts.get("units_taken_by_stage", {})}), "final": final,
    }


def busy_by_stage(busy):
    """The workers' busy seconds summed per kind of stage (`sim.000.step` and `sim.001.step` together)."""
    total = {}
    for stages in busy.values():
        for name, seconds in stages.items():
            kind = name.split(".")[0] + "." + name.split(".")[-1]
            total[kind] = round(total.get(kind, 0) + seconds, 2)
    return total


MARKER = "made-by-bench-scale"


def remove_folders_of_killed_runs(parent):
    """A SIGKILLed run leaves its bench-scale-<pid> folder (GBs on /dev/shm): delete those this script made (they
    hold its marker) whose process is gone."""
    for folder in parent.glob("bench-scale-*"):
        pid = folder.name.removeprefix("bench-scale-")
        if not pid.isdigit() or not (folder / MARKER).is_file():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            print(f"removing {folder}, left by a killed run", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def main_simulated(args):
    # Each simulated worker is one GPU's host: given one CPU (cpus_per_worker=1), it computes with the render
    # process's torch thread count (executor), so one. With the default (a thread per core) 8 workers' OpenMP
    # pools would spin against each other on this machine's 2 cores and time the machine, not the executor.
    torch.set_num_threads(1)
    remove_folders_of_killed_runs(Path(args.folder))
    folder = Path(args.folder) / f"bench-scale-{os.getpid()}"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(f"made by bench/scale.py, process {os.getpid()}\n")
    results, reference = [], None
    try:
        for workers in args.workers:
            result = simulate(workers, args, folder)
            final = result.pop("final")
            if reference is None:
                reference = final
            elif final != reference:
                sys.exit(f"{workers} workers gave other final latents than {args.workers[0]}")
            results.append(result)
            base = results[0]["span_s"] * results[0]["workers"]
            result["speedup"] = round(base / result["span_s"], 2)
            print(f"{workers} worker(s): {result['span_s']:.1f} s, speed-up {result['speedup']:.2f}×, coordinator "
                  f"CPU {100 * result['coordinator_cpu_share']:.0f} %, bytes/step {result['bytes_per_step'] / 1e6:.1f}"
                  f" MB = {result['bytes_per_step_vs_minimum']:.2f}× the minimum (to workers "
                  f"{result['bytes_to_workers_per_step'] / 1e6:.1f} MB), render's bytes to workers "
                  f"{result['bytes_to_workers'] / 1e6:.0f} MB (maps once: {result['bytes_to_workers_minimum'] / 1e6:.0f}),"
                  f" ControlNet evaluations per frame-step {result['controlnet_evaluations_per_frame_step']:.3f}, "
                  f"coordinator ms/unit {result['coordinator_ms_per_unit']}", flush=True)
            top = results[-1]
            ok = top["speedup"] >= args.target and all(r["bytes_per_step_vs_minimum"] <= 1.5 for r in results)
            record = {"mode": "simulated", "fill_in_span": args.fill_in_span,
                      "frames": args.frames, "steps": args.steps, "window_s": args.window_s,
                      "size": "1280x768", "cores": os.cpu_count(), "folder": args.folder,
                      "baseline_workers": args.workers[0], "results": results, "target_speedup": args.target,
                      "meets_target": ok, "load_average": os.getloadavg()}
            RESULTS.mkdir(exist_ok=True)  # after each N: a run stopped part way keeps what it measured
            (RESULTS / "scale_simulated.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{top['workers']} workers: {top['speedup']:.2f}× (target ≥ {args.target}×); identical final latents")
    return 0 if ok else 1


# --- the real denoising on CPU workers ---------------------------------------------------------------------------
KEPT_STAGES = ("crop", "annotate.", "prompts", "latents")


def bench_config(assets, clip, run_dir, frames, size, workers, steps=2):
    models = assets / "models"
    return {
        "models": {"model_list": [str(models / "stable_diffusion"), str(models / "motion_adapter")],
                   "controlnet_units": [
                       {"processor_id": "tile", "model_path": str(models / "controlnet_tile"), "scale": 0.5},
                       {"processor_id": "canny", "model_path": str(models / "controlnet_canny"), "scale": 0.5}],
                   "device": "cpu"},
        "data": {"input_frames": {"video_file": str(clip), "width": size, "height": size, "start_frame_id": 0,
                                  "end_frame_id": frames},
                 "output_folder": str(run_dir), "save_frames": False},
        "pipeline": {"seed": 1, "pipeline_inputs": {
            "prompt": "a toon city", "num_inference_steps": steps, "animatediff_batch_size": 16,
            "animatediff_stride": 8, "unet_batch_size": 16, "controlnet_batch_size": 8,
            "smoother_progress_ids": []}},
        "executor": {"workers": workers},
    }


def render(config_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "diffsynth", "render", str(config_path), "--no-progress",
                             "--force"], capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"render failed: {result.stderr[-2000:]}")


def denoise_span(run_dir):
    """Seconds from the first window's commit to the last denoising unit's commit: the models are loaded and warm
    on both sides (a worker loads them on its first unit; the render process may have loaded them earlier)."""
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    start = db.execute("SELECT MIN(finished) FROM units WHERE stage = 'denoise.000.windows'").fetchone()[0]
    end = db.execute("SELECT MAX(finished) FROM units WHERE stage LIKE 'denoise.%'").fetchone()[0]
    db.close()
    return end - start


def main_real(args):
    from diffsynth.demo import ensure_demo_assets, write_synthetic_clip
    assets = ensure_demo_assets()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        clip = work / "clip.mp4"
        write_synthetic_clip(clip, num_frames=args.frames, width=args.size * 3 // 2, height=args.size * 3 // 2,
                             audio=False)
        base = work / "base"
        config = base.with_suffix(".yaml")
        config.write_text(yaml.safe_dump(bench_config(assets, clip, base, args.frames, args.size, 1, args.steps)))
        print(f"rendering the base run ({args.frames} frames, {args.size}²) …", flush=True)
        render(config)
        results, reference = {}, None
        for repeat in range(args.repeats):  # alternating: medians, on a shared machine
            for label, workers in (("in-process", 1), ("2 workers", 2)):
                run_dir = work / f"{label.replace(' ', '_')}_{repeat}"
                shutil.copytree(base, run_dir)
                cache = RunCache(run_dir)
                for name in cache.stage_names():
                    if not name.startswith(KEPT_STAGES):
                        cache.reset_stage(name)
                cache.close()
                config = run_dir.with_suffix(".yaml")
                config.write_text(yaml.safe_dump(bench_config(assets, clip, run_dir, args.frames, args.size,
                                                              workers, args.steps)))
                render(config)
                span = denoise_span(run_dir)
                results.setdefault(label, []).append(round(span, 2))
                print(f"{label}: denoising {span:.1f} s", flush=True)
                out = (run_dir / "video.mp4").read_bytes()
                if reference is None:
                    reference = out
                elif out != reference:
                    sys.exit(f"{label} gave different bytes")
        medians = {label: float(np.median(spans)) for label, spans in results.items()}
        speedup = medians["in-process"] / medians["2 workers"]
        print(f"2 CPU workers vs in-process: {speedup:.2f}×; outputs identical")
        record = {"mode": "real", "frames": args.frames, "size": args.size, "steps": args.steps,
                  "cores": os.cpu_count(),
                  "denoise_s": results, "median_s": medians, "speedup_2_workers": round(speedup, 3),
                  "identical": True, "load_average": os.getloadavg()}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale_real.json").write_text(json.dumps(record, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    simulated = modes.add_parser("simulated", help="the executor at 1280×768 with the model replaced by a sleep")
    simulated.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    simulated.add_argument("--frames", type=int, default=264)
    simulated.add_argument("--steps", type=int, default=10, help="Diffutoon's num_inference_steps")
    simulated.add_argument("--window-s", type=float, default=0.5)
    simulated.add_argument("--target", type=float, default=7.0)
    simulated.add_argument("--folder", default="/dev/shm")
    simulated.add_argument("--fill-in-span", action="store_true",
                           help="make the conditioning frames and initial latents in the timed pass too")
    real = modes.add_parser("real", help="the denoising stages with the tiny models on 1 and 2 CPU workers")
    real.add_argument("--frames", type=int, default=40)
    real.add_argument("--size", type=int, default=64)
    real.add_argument("--steps", type=int, default=2)
    real.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    return main_simulated(args) if args.mode == "simulated" else main_real(args)


if __name__ == "__main__":
    sys.exit(main())
