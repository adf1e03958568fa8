"""`diffsynth plan`: what a render of a config will need, before any work — its stages and unit counts, the disk it
will hold at its peak and at the end under its `data.keep` policy, the VRAM it is predicted to need, and, for a run
folder that already exists, how much is done and how long the rest should take.

Disk: every unit's size is known before it is computed. Tensors (latents, ε, FastBlend's tables, the prompt
embeddings) have known shapes, so their safetensors size is exact (serialized from zeros of that shape). Frames go
through the cache's image codec, whose size depends on the picture: the first cropped input frames are decoded,
cropped and encoded with the cache's own `image_to_bytes` (the stages' own code, on an in-memory cache), and that
size stands for every frame of the output's size; the video's size is measured by encoding those frames with the
render's encoder. The runner's order of writes and releases is then replayed (its own `releasable` decision, the
FastBlend tables released as the stage goes) to find the peak. The render itself calls `check_free_space` and refuses
to start when the disk cannot hold the peak minus what the run folder already stores.
"""

import logging
import os
import re
import shutil
import sqlite3
import statistics
import tempfile
from pathlib import Path

import torch

from .cache import MANIFEST, NOT_A_MANIFEST, RELEASED, image_to_bytes, image_to_png, open_manifest, tensors_to_bytes
from .errors import UserError

log = logging.getLogger("diffsynth")
FRAMES_MEASURED = 2  # source frames decoded to measure the codec: enough for a steady size, cheap on a long video
PAUSE_SECONDS = 60.0  # a gap between two finishes longer than this is a pause (interrupted, resumed), not work
FREE_BYTES_HOOK = "DIFFSYNTH_TEST_FREE_BYTES"  # testing aid: the free space the disk check sees, in bytes


class MemoryCache:
    """The little of RunCache that the stages' own code needs to compute a unit from another: bytes by
    (stage, key), in memory. Lets plan measure the real codec on the real frames without a run folder."""

    def __init__(self):
        self.units = {}

    def read(self, stage, key):
        return self.units[(stage, key)]


class AbsentModels:
    """Stands in for the ModelStore when the config's model files cannot be read, so that the stages are still built
    exactly as the render would (their unit counts and sizes do not depend on the weights). What it cannot know
    (fingerprints) it never claims: `identity` is marked absent."""

    def __init__(self, models_config):
        from .config import MOTION_MODULE_MAX_FRAMES
        from .models.loader import resolve_device, resolve_dtype
        self.config = models_config
        self.device = resolve_device(models_config.device)
        self.dtype = resolve_dtype(models_config.torch_dtype, self.device)
        # Only the noise schedule and the window-length check depend on it: never a unit's count or size.
        self.has_motion_module = len(models_config.model_list) > 1
        self.motion_max_frames = MOTION_MODULE_MAX_FRAMES

    def identity(self, *components):
        return {"absent": True}

    def vae_tile(self, height, width):
        from .models.loader import DEFAULT_VAE_TILE_SIZE, vae_tile
        return vae_tile(getattr(self.config, "vae_tile_size", DEFAULT_VAE_TILE_SIZE), height, width)


def build_plan_stages(config):
    """(stages, models note): the stage list exactly as `render` builds it (pipeline.build_stages). When the model
    files cannot be read, the note says why in one line and the stages are built around AbsentModels."""
    from .models.loader import ModelStore
    from .pipeline import RenderContext, build_stages

    note = None
    try:
        models = ModelStore(config.models)
    except UserError as error:
        models, note = AbsentModels(config.models), str(error).splitlines()[0]
    ctx = RenderContext(config, None, models)
    return build_stages(ctx), note


# --- unit sizes -------------------------------------------------------------------------------------------------

def _tensor_size(**tensors):
    """The exact safetensors size of tensors of these shapes ((shape, dtype) pairs): serialized from zeros."""
    return len(tensors_to_bytes({name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in tensors.items()}))


def _is_image_only(stage):
    """Stages computed from frames alone, without a model: the measured ones (decode/crop, the non-learned
    annotators). Learned annotators would load their networks: they are sized as an RGB frame instead."""
    from .stages.annotate import ANNOTATOR_FILES, AnnotateStage
    if not stage.inputs:
        return stage.name.startswith(("decode", "crop"))
    if isinstance(stage, AnnotateStage):
        return stage.processor_id not in ANNOTATOR_FILES and stage.processor_id != "openpose"
    return type(stage).__name__ == "CropStage"  # a crop reading a separate decode stage (older layouts)


def measure_frames(stages, ctx):
    """{stage name: mean bytes of a unit} for the frame stages computed from the source alone, each run on its first
    FRAMES_MEASURED units through the stages' own code and the cache's codec; and the first cropped frames
    (uint8 arrays) of the input. Annotators that fail here (weights missing) are simply not measured."""
    from .cache import bytes_to_image
    previous, ctx.cache = ctx.cache, MemoryCache()
    sizes, frames = {}, []
    try:
        for stage in stages:
            if not _is_image_only(stage) or any(upstream.name not in sizes for upstream in stage.inputs):
                continue
            keys = stage.unit_keys()[:FRAMES_MEASURED]
            try:
                produced = list(stage.run(keys))
            except UserError:
                raise
            except Exception as error:  # noqa: BLE001 - an annotator that cannot run here: sized as a frame
                log.info("plan: could not measure %s (%s); sized as an RGB frame", stage.name, error)
                continue
            for key, data, _ in produced:
                ctx.cache.units[(stage.name, key)] = data
            sizes[stage.name] = sum(len(data) for _, data, _ in produced) / max(1, len(produced))
            if stage.name == "crop":
                frames = [bytes_to_image(data) for _, data, _ in produced]
    finally:
        ctx.cache = previous
    return sizes, frames


def _text_width(models):
    """The text encoder's hidden size, read from the model's config or tensor shapes (no weights loaded)."""
    import json
    try:
        base = models.files.base
        if base.is_dir():
            return json.loads((base / "text_encoder" / "config.json").read_text())["hidden_size"]
        from .models.checkpoint import read_shapes
        for key, shape in read_shapes(base).items():
            if key.endswith("token_embedding.weight") and shape:
                return shape[-1]
    except Exception:  # noqa: BLE001 - absent or unusual models: SD1.5's width
        pass
    return 768


def _prompt_chunks(stage):
    try:
        return max(len(stage._tokens(text)[0]) for text in stage.all_prompt_texts())
    except Exception:  # noqa: BLE001 - no tokenizer without the models: one 77-token chunk (most prompts)
        return 1


def unit_sizes(stages, ctx, measured, frames):
    """{stage name: {key: bytes}} for every unit of every stage."""
    from .stages.denoise import DenoiseWindowsStage
    from .stages.encode import VIDEO_KEY, EncodeStage
    from .stages.prompts import EMBEDDINGS_KEY, PromptStage
    from .stages.shots import ShotsStage, shots_to_bytes
    from .stages.smooth import SmoothStage

    frames_config = ctx.config.data.input_frames
    width, height = frames_config.width, frames_config.height
    latent_shape = (4, height // 8, width // 8)
    latent = _tensor_size(latent=(latent_shape, torch.float32))
    table = _tensor_size(table=((height, width, 3), torch.float16))  # FastBlend's blends, stored as float16
    made = model_made_frames(ctx.models, frames)  # what the models' frames look like, as near as can be cheaply had
    if made:
        rgb = sum(len(image_to_bytes(frame)) for frame in made) / len(made)
        png = sum(len(image_to_png(frame)) for frame in made) / len(made)
    else:
        rgb = png = len(image_to_bytes(torch.zeros((height, width, 3), dtype=torch.uint8).numpy()))
    sizes = {}
    for stage in stages:
        keys = stage.unit_keys()
        if stage.name in measured:
            sizes[stage.name] = dict.fromkeys(keys, measured[stage.name])
        elif isinstance(stage, ShotsStage):
            shots = len(shots_to_bytes(ctx.shot_starts or [0], len(stage.frames.frame_keys())))
            sizes[stage.name] = dict.fromkeys(keys, shots)
        elif isinstance(stage, PromptStage):
            shape = ((1, 77 * _prompt_chunks(stage), _text_width(ctx.models)), torch.float32)
            one = _tensor_size(embedding=shape)
            sizes[stage.name] = {key: _tensor_size(negative=shape, positive=shape) if key == EMBEDDINGS_KEY else one
                                 for key in keys}
        elif isinstance(stage, DenoiseWindowsStage):
            sizes[stage.name] = {key: _tensor_size(eps=((end - start, *latent_shape), torch.float32))
                                 for key, (start, end) in zip(keys, stage.windows)}
        elif isinstance(stage, SmoothStage):
            sizes[stage.name] = {key: table if key.startswith("table") else rgb for key in keys}
        elif isinstance(stage, EncodeStage):
            video = _video_size(stage, made, len(stage.final_frames.frame_keys()))
            sizes[stage.name] = {key: video if key == VIDEO_KEY else png for key in keys}
        elif _is_latent_stage(stage):
            sizes[stage.name] = dict.fromkeys(keys, latent)
        else:  # decoded frames, x0 previews, enhanced frames, learned annotators: a frame of the output's size
            sizes[stage.name] = dict.fromkeys(keys, rgb)
    return sizes


def model_made_frames(models, frames):
    """The first cropped frames as the models' VAE gives them back (encoded, then decoded in float32, as every
    model-made frame is): how well the frames the render makes compress depends on the VAE's output, which a good
    VAE keeps close to the input and a poor one fills with noise. The input frames themselves without the models
    (absent files) or when the VAE cannot run here."""
    if not frames or isinstance(models, AbsentModels):
        return frames
    from .stages.latents import encode_image
    from .stages.vae_decode import decode_latent
    try:
        vae = models.vae
        made = []
        for frame in frames:
            tile = models.vae_tile(*frame.shape[:2])  # tiled as the render tiles it: a large frame fits the GPU
            made.append(decode_latent(vae, encode_image(vae, frame, tile), tile))
        return made
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - a VAE that cannot run here: the input frames stand in
        log.info("plan: could not run the VAE on the first frames (%s); sizing with the input frames", error)
        return frames


def _is_latent_stage(stage):
    from .stages.denoise import DenoiseStepStage
    from .stages.latents import InitialLatentsStage
    return isinstance(stage, (DenoiseStepStage, InitialLatentsStage))


def _video_size(stage, frames, count):
    """video.mp4's size: the measured frames encoded with the render's encoder and CRF, scaled to the frame count
    (the first frame is an I-frame, so this leans high, the safe side for a disk check)."""
    if not frames:
        return 0
    from .video import encode_video
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.mp4"
        try:
            encode_video(path, iter(frames), stage.fps, stage.crf, stage.width, stage.height, codec=stage.codec)
        except Exception as error:  # noqa: BLE001 - an encoder that is not available here
            log.info("plan: could not measure the video (%s)", error)
            return 0
        return round(path.stat().st_size / len(frames) * count)


def calibrate(stages, sizes, done):
    """Once a run folder holds kept units, their real sizes replace the predictions: each kept unit its own size,
    and the other units of the same kind (frames the models made, the frames/ PNGs, a stage's own frames) the mean
    of the kept ones. The first prediction stands in for the frames the models make with the input frames' size;
    the real ones can be larger (noisy pictures compress less) or smaller (flat toon colours)."""
    from .stages.encode import VIDEO_KEY
    kinds = {}
    for stage in stages:
        for key in stage.unit_keys():
            size = done.get((stage.name, key), RELEASED)
            if size >= 0:
                kinds.setdefault(_unit_kind(stage, key), []).append(size)
                sizes[stage.name][key] = size
    means = {kind: sum(values) / len(values) for kind, values in kinds.items()}
    for stage in stages:
        for key in stage.unit_keys():
            if done.get((stage.name, key), RELEASED) < 0 and key != VIDEO_KEY:
                kind = _unit_kind(stage, key)
                if kind in means:
                    sizes[stage.name][key] = means[kind]


def _unit_kind(stage, key):
    """What a unit's size is like: the frames every model-made stage writes share one kind; other units their
    stage's (and table/frame/png within it)."""
    from .stages.smooth import EnhanceStage, InLoopX0Stage, SmoothStage
    from .stages.vae_decode import VaeDecodeStage
    if key.startswith("table") or key.endswith(".png"):
        return ("table" if key.startswith("table") else "png", stage_kind(stage.name))
    if isinstance(stage, (VaeDecodeStage, InLoopX0Stage, SmoothStage, EnhanceStage)):
        return "model frame"
    return ("unit", stage_kind(stage.name))


# --- the run folder as it is ----------------------------------------------------------------------------------------

def read_run_folder(run_dir):
    """What an existing run folder holds, read-only: {"stages": {name: fingerprint}, "units": {(stage, key): size
    (-1 released)}, "finished": {stage: [finish times]}}; None when there is no manifest."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.is_file():
        return None
    db = open_manifest(run_dir, read_only=True)  # a damaged one: one line (UserError), and it is left as it is
    try:
        stages = dict(db.execute("SELECT name, fingerprint FROM stages"))
        units, finished = {}, {}
        for stage, key, size, when in db.execute("SELECT stage, key, size, finished FROM units ORDER BY finished"):
            units[(stage, key)] = size
            finished.setdefault(stage, []).append(when)
    except sqlite3.OperationalError:  # a manifest whose tables do not exist yet
        return None
    except sqlite3.DatabaseError:
        raise UserError(NOT_A_MANIFEST.format(path=manifest)) from None
    finally:
        db.close()
    return {"stages": stages, "units": units, "finished": finished}


def valid_done(stages, folder, trust_names=False):
    """{(stage, key): stored size} of the done units the render would reuse: those of stages whose fingerprint is
    unchanged (all stages of the same name when `trust_names`: the models are absent, fingerprints unknown)."""
    if not folder:
        return {}
    valid = set()
    for stage in stages:
        stored = folder["stages"].get(stage.name)
        if stored is None:
            continue
        try:
            same = trust_names or stage.fingerprint == stored
        except Exception:  # noqa: BLE001 - a fingerprint that needs a missing file: taken as unchanged
            same = True
        if same:
            valid.add(stage.name)
    return {unit: size for unit, size in folder["units"].items() if unit[0] in valid}


def _forced_recomputes(stages, done):
    """The released units the runner will bring back (`_recompute_released_inputs`): those a unit still to be
    computed reads, and in turn those they read."""
    by_name = {stage.name: stage for stage in stages}
    released = {unit for unit, size in done.items() if size == RELEASED}
    worklist = [(stage, key) for stage in stages for key in stage.unit_keys() if (stage.name, key) not in done]
    forced = set()
    while worklist:
        stage, key = worklist.pop()
        for upstream, upstream_key in stage.reads(key):
            unit = (upstream.name, upstream_key)
            if unit in released:
                released.discard(unit)
                forced.add(unit)
                worklist.append((by_name[upstream.name], upstream_key))
    return forced


# --- the runner's order, replayed ------------------------------------------------------------------------------

def simulate(stages, sizes, keep=None, done=None):
    """Replay the runner's writes and releases: (peak bytes, final bytes, {stage: bytes kept at the end}). `done`:
    {(stage, key): stored size} of units already done (they are not written again; kept ones are on disk from the
    start). `keep` overrides the stages' data.keep policy (to compare policies)."""
    from .runner import releasable
    from .stages.smooth import SmoothStage, table_file

    done = dict(done or {})
    for unit in _forced_recomputes(stages, done):
        done.pop(unit)
    on_disk = {stage.name: {} for stage in stages}
    for (name, key), size in done.items():
        if size >= 0 and name in on_disk:
            on_disk[name][key] = size
    total = peak = sum(sum(files.values()) for files in on_disk.values())
    readers = {stage.name: [other.name for other in stages if stage in other.inputs] for stage in stages}
    complete, retired = set(), set()

    def drop(name, keys):
        nonlocal total
        for key in keys:
            total -= on_disk[name].pop(key, 0)

    for stage in stages:
        files = on_disk[stage.name]
        smooth = isinstance(stage, SmoothStage)
        for position, key in enumerate(stage.unit_keys()):
            if (stage.name, key) not in done:
                files[key] = sizes[stage.name][key]
                total += files[key]
                peak = max(peak, total)
            if smooth:  # the stage releases each table once no later unit of its plan reads it
                drop(stage.name, [table_file(table) for table in stage.plan.newly_releasable(position + 1)])
        if smooth:
            drop(stage.name, [key for key in list(files) if key.startswith("table")])
        complete.add(stage.name)
        for upstream in stage.inputs:  # as runner._retire_finished_inputs
            if (releasable(upstream, keep) and upstream.name not in retired
                    and all(name in complete for name in readers[upstream.name])):
                retired.add(upstream.name)
                drop(upstream.name, list(on_disk[upstream.name]))
    return peak, total, {name: sum(files.values()) for name, files in on_disk.items()}


# --- the run folder's own files -----------------------------------------------------------------------------------

MANIFEST_SAMPLE = 256  # unit rows replayed into a scratch manifest to measure its bytes and its WAL's per unit
WAL_FRAME_HEADER, WAL_HEADER = 24, 32  # SQLite's WAL: each page written is stored with a 24-byte frame header
SHM_BYTES = 32768  # the WAL index (-shm): 32 KiB per 4096 WAL frames
LOG_BYTES, LOG_BYTES_PER_STAGE = 400, 125  # render.log: two lines a stage and a few more (measured: 2.0 kB, 13 stages)


def run_folder_overhead(config, stages, done=None):
    """(peak bytes, final bytes) of what the run folder holds besides the units' files: manifest.sqlite, its WAL
    (-wal, -shm) while the render runs, render.log, config.json and the lock. The manifest's bytes and the WAL's
    pages per unit are measured by replaying a sample of the units' two transactions into a scratch manifest with
    the cache's own code (diffsynth.cache.RunCache.record_pending / record_unit); the WAL grows by the pages each
    commit writes until SQLite's automatic checkpoint (wal_autocheckpoint pages) copies it into the manifest and
    starts it over from the front, so it peaks at about that many pages on a long render, and is deleted when the
    render closes the manifest. On a short render the WAL alone can be most of the run folder."""
    from .cache import RunCache
    from .config import config_json
    done = done or {}
    units = [(stage.name, key) for stage in stages for key in stage.unit_keys()]
    to_write = sum(1 for unit in units if unit not in done)
    if not to_write and done:  # a finished run folder: its files are what they will stay
        existing = folder_files_bytes(config.data.output_folder)
        return existing, existing
    sample = units[::max(1, len(units) // MANIFEST_SAMPLE)][:MANIFEST_SAMPLE] or [("stage", "key")]
    with tempfile.TemporaryDirectory(prefix="diffsynth-plan-") as folder:
        scratch = RunCache(folder)
        try:
            scratch.db.execute("PRAGMA synchronous=OFF")  # the same pages, without the fsyncs
            page = scratch.db.execute("PRAGMA page_size").fetchone()[0]
            checkpoint_pages = scratch.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            scratch.db.execute("PRAGMA wal_autocheckpoint=0")  # count every page the sample writes
            wal = Path(folder) / (MANIFEST + "-wal")
            wal_before = wal.stat().st_size if wal.exists() else 0
            for stage, key in sample:
                relative = scratch.relative_path(stage, key)
                scratch.record_pending(relative)
                scratch.record_unit(stage, key, relative, 1 << 20, "0" * 32)
            wal_per_unit = (wal.stat().st_size - wal_before) / len(sample)
            scratch.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            manifest_per_unit = (Path(folder) / MANIFEST).stat().st_size / len(sample)
        finally:
            scratch.close()
    manifest = manifest_per_unit * len(units)
    wal_peak = min(wal_per_unit * to_write, (checkpoint_pages + wal_per_unit / (page + WAL_FRAME_HEADER)) *
                   (page + WAL_FRAME_HEADER)) + WAL_HEADER
    files = LOG_BYTES + LOG_BYTES_PER_STAGE * len(stages) + len(config_json(config)) + len(f"pid {os.getpid()}")
    return manifest + wal_peak + SHM_BYTES + files, manifest + files


def folder_files_bytes(run_dir):
    """What the run folder's own files (manifest, WAL, log, config.json, lock) hold now."""
    from .cache import RUN_FILES
    total = 0
    for name in [MANIFEST, *RUN_FILES]:
        path = Path(run_dir) / name
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


# --- time -------------------------------------------------------------------------------------------------------------

def stage_kind(name):
    """Stages that cost the same per unit: denoise.003.windows is timed like denoise.000.windows."""
    return re.sub(r"\.\d{3}\.", ".k.", name)


def seconds_per_unit(finished):
    """The median gap between a stage's consecutive unit finishes (pauses longer than PAUSE_SECONDS left out), or
    None without a gap. Throughput, not latency: with many workers it is the time the stage really takes
    per unit. The first unit's own time (model loading) is never a gap."""
    times = sorted(finished)
    gaps = [b - a for a, b in zip(times, times[1:]) if b - a <= PAUSE_SECONDS]
    return statistics.median(gaps) if gaps else None


# --- VRAM -----------------------------------------------------------------------------------------------------------

def predicted_vram(config, models):
    """(predicted peak VRAM bytes or None, the device's memory in bytes or None, a note). diffsynth.vram holds the
    model where this version has it; on the CPU it is the prediction for a GPU."""
    from .models.loader import resolve_device
    memory = device_memory(config)
    try:
        from . import vram
        predict = vram.predict_for_config
    except (ImportError, AttributeError):
        return None, memory, "unknown (this version has no VRAM model)"
    device = resolve_device(config.models.device)
    device = device if device.startswith("cuda") else "cuda"
    motion = bool(getattr(models, "has_motion_module", True))
    try:
        batches = {}
        resolve = getattr(vram, "resolve_batch_sizes", None)
        if resolve is not None:  # `auto` batch sizes become the numbers the render would use
            batches = dict(zip(("unet_batch_size", "controlnet_batch_size"),
                               resolve(config, memory, device=device, motion_module=motion)))
        return int(predict(config, device=device, motion_module=motion, **batches)), memory, None
    except Exception as error:  # noqa: BLE001 - a prediction is advice: the render decides nothing on it
        return None, memory, f"unknown ({str(error).splitlines()[0] if str(error) else type(error).__name__})"


def device_memory(config):
    from .models.loader import resolve_device
    device = resolve_device(config.models.device)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


# --- shots ------------------------------------------------------------------------------------------------------------

def shot_plan(config, stages):
    """The shots (data.shots) and the sliding windows of each: {"shots": auto|none|given, "threshold" (auto),
    "list": [{"start", "length", "windows"}]}."""
    from .schedule import shot_ranges
    from .stages.denoise import DenoiseWindowsStage
    ctx = stages[0].ctx
    num_frames = len(stages[0].unit_keys())
    windows = next((stage.windows for stage in stages if isinstance(stage, DenoiseWindowsStage)), [])
    shots = config.data.shots if isinstance(config.data.shots, str) else "given"
    plan = {"shots": shots, "list": [
        {"start": start, "length": end - start, "windows": sum(1 for first, _ in windows if start <= first < end)}
        for start, end in shot_ranges(ctx.shot_starts or [0], num_frames)]}
    if shots == "auto":
        plan["threshold"] = config.data.shot_threshold
    return plan


SHOTS_LISTED = 20  # shots listed one per line in the text; --json lists them all


def shot_lines(shots):
    how = {"auto": f"detected by PySceneDetect's content detector, threshold {shots.get('threshold')}",
           "none": "data.shots: none", "given": "as given in data.shots"}[shots["shots"]]
    listed = shots["list"]
    windows = sum(shot["windows"] for shot in listed)
    lines = [f"shots: {len(listed)} ({how}); {windows} sliding window(s), none crossing a cut"]
    for shot in listed[:SHOTS_LISTED]:
        lines.append(f"  frames {shot['start']}-{shot['start'] + shot['length'] - 1} ({shot['length']} frames): "
                     f"{shot['windows']} window(s)")
    if len(listed) > SHOTS_LISTED:
        lines.append(f"  … and {len(listed) - SHOTS_LISTED} more (--json lists them all)")
    return lines


# --- the plan ---------------------------------------------------------------------------------------------------------

def existing_parent(path):
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(run_dir):
    """Free space on the disk the run folder is (or will be) on."""
    hook = os.environ.get(FREE_BYTES_HOOK)
    if hook:
        return int(hook)
    return shutil.disk_usage(existing_parent(run_dir)).free


def disk_plan(config, stages, models_note=None):
    """The disk part of the plan (no VRAM, no timing): measured sizes, the replayed peak and final, what is stored."""
    ctx = stages[0].ctx
    measured, frames = measure_frames(stages, ctx)
    sizes = unit_sizes(stages, ctx, measured, frames)
    folder = read_run_folder(config.data.output_folder)
    done = valid_done(stages, folder, trust_names=models_note is not None)
    calibrate(stages, sizes, done)
    stored = sum(size for size in (folder["units"].values() if folder else ()) if size > 0)
    peak, final, kept = simulate(stages, sizes, done=done)
    fresh_peak, fresh_final, _ = simulate(stages, sizes)
    # The run folder's own files (manifest, WAL, log) come on top: at the units' peak the WAL is at its largest.
    overhead_peak, overhead_final = run_folder_overhead(config, stages, done)
    fresh_overhead_peak, _ = run_folder_overhead(config, stages) if done else (overhead_peak, overhead_final)
    stored += folder_files_bytes(config.data.output_folder) if folder else 0
    return {"sizes": sizes, "done": done, "folder": folder, "stored": stored, "peak": peak + overhead_peak,
            "final": final + overhead_final, "kept": kept, "fresh_peak": fresh_peak + fresh_overhead_peak,
            "fresh_final": fresh_final + overhead_final, "overhead_peak": overhead_peak,
            "overhead_final": overhead_final}


def make_plan(config):
    """Everything `diffsynth plan` prints, as a JSON-able dict."""
    from .cache import check_run_folder
    check_run_folder(config.data.output_folder)  # what render would refuse, before the work of planning
    stages, note = build_plan_stages(config)
    disk = disk_plan(config, stages, note)
    vram, device_bytes, vram_note = predicted_vram(config, stages[0].ctx.models)
    folder = disk["folder"]
    rates = {}
    for name, times in (folder["finished"] if folder else {}).items():
        rate = seconds_per_unit(times)
        if rate is not None:
            rates.setdefault(stage_kind(name), rate)
            rates[name] = rate
    rows = []
    for stage in stages:
        keys = stage.unit_keys()
        done = sum(1 for key in keys if (stage.name, key) in disk["done"])
        rate = rates.get(stage.name, rates.get(stage_kind(stage.name)))
        rows.append({"name": stage.name, "units": len(keys), "done": done,
                     "bytes": round(sum(disk["sizes"][stage.name].values())),
                     "final_bytes": round(disk["kept"][stage.name]),
                     "seconds_per_unit": rate, "seconds_left": None if rate is None else rate * (len(keys) - done)})
    left = [row["seconds_left"] for row in rows if row["done"] < row["units"]]
    policies = {policy: round(simulate(stages, disk["sizes"], keep=policy)[0] + disk["overhead_peak"])
                for policy in ("all", "resume", "outputs")}
    return {"run_dir": str(config.data.output_folder), "keep": config.data.keep, "models": note,
            "disk_peak_bytes": round(disk["peak"]), "disk_final_bytes": round(disk["final"]),
            "disk_peak_bytes_from_scratch": round(disk["fresh_peak"]),
            "disk_stored_bytes": disk["stored"], "disk_free_bytes": free_bytes(config.data.output_folder),
            "disk_run_files_peak_bytes": round(disk["overhead_peak"]),  # manifest + WAL + log + config.json + lock
            "disk_peak_bytes_by_policy": policies,
            "vram_peak_bytes": vram, "vram_device_bytes": device_bytes, "vram_note": vram_note,
            "seconds_left": (sum(left) if None not in left else None) if left else (0.0 if folder else None),
            "warnings": [line for stage in stages for line in stage.input_warnings()],
            "shots": shot_plan(config, stages), "stages": rows}


def size_text(count):
    if count is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def time_text(seconds):
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_lines(plan):
    """The plan as text, for the CLI and the web UI."""
    lines = [f"plan for {plan['run_dir']} (data.keep: {plan['keep']})"]
    if plan["models"]:
        lines.append(f"models: not loaded ({plan['models']}); the disk is planned without them")
    lines += [f"warning: {line}" for line in plan.get("warnings", [])]
    lines.append(f"  {'stage':<28} {'units':>6} {'done':>6} {'written':>10} {'kept':>10}  time left")
    for row in plan["stages"]:
        lines.append(f"  {row['name']:<28} {row['units']:>6} {row['done']:>6} {size_text(row['bytes']):>10} "
                     f"{size_text(row['final_bytes']):>10}  {time_text(row['seconds_left'])}")
    if "shots" in plan:
        lines += shot_lines(plan["shots"])
    others = ", ".join(f"{policy} {size_text(peak)}" for policy, peak in plan["disk_peak_bytes_by_policy"].items()
                       if policy != plan["keep"])
    lines.append(f"disk: peak {size_text(plan['disk_peak_bytes'])}, at the end {size_text(plan['disk_final_bytes'])}"
                 f" (already stored {size_text(plan['disk_stored_bytes'])}, free {size_text(plan['disk_free_bytes'])});"
                 f" peak with data.keep {others}")
    if plan["vram_peak_bytes"] is None:
        vram = f"VRAM: {plan['vram_note']}"
    else:
        vram = f"VRAM: {size_text(plan['vram_peak_bytes'])} predicted"
    device = plan["vram_device_bytes"]
    lines.append(vram + (f", the GPU has {size_text(device)}" if device else ", no GPU in use here"))
    if plan["seconds_left"] is not None:
        lines.append(f"time left: about {time_text(plan['seconds_left'])} (from this run folder's unit timings)")
    elif any(row["done"] for row in plan["stages"]):
        lines.append("time left: unknown until a few units of every remaining stage have run")
    return lines


def check_free_space(config, stages):
    """Refuse (UserError, exit code 2) a render whose predicted peak, minus what its run folder already stores, does
    not fit the free space of its disk. Called by render before the run folder is created or touched."""
    run_dir = config.data.output_folder
    disk = disk_plan(config, stages)
    need = disk["peak"] - disk["stored"]
    free = free_bytes(run_dir)
    if need > free:
        raise UserError(f"not enough free disk for this render: its peak is about {size_text(disk['peak'])} and "
                        f"{size_text(disk['stored'])} is already stored in {run_dir}, so it needs "
                        f"{size_text(need)} more, but {existing_parent(run_dir)} has {size_text(free)} free; free "
                        "space, set data.keep to resume or outputs (see `diffsynth plan`), or pass --force to render "
                        "anyway")
    return disk
