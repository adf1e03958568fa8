"""The original Diffutoon (PyPI `diffsynth==1.1.7`, DiffSynth-Studio's SDVideoPipeline) as a reference to run against.

Its package is also called `diffsynth`, so it lives in its own virtual environment, outside the repository, and runs
in its own process. This one file is both sides:

- imported from this project's interpreter, it is the API: `ensure_venv` (create the venv from PyPI), `write_weights`
  (random real-size SD1.5 / AnimateDiff v2 / ControlNet v1.1 / LoRA / textual-inversion files in the original's
  file layouts), `run_original` (run the original on given frames with injected initial noise, in its venv, and
  return what it computed);
- run by the original's interpreter (`python original_diffutoon.py worker SPEC OUT`), it is the worker: it builds the
  original's ModelManager and SDVideoPipeline, hooks a few of its functions from outside to record every sliding
  window's ε, every step's latents and the decoded frames, and writes them to OUT. The original's files are never
  edited.

The worker must not see this project's package: it runs with this file's folder (bench/) first on sys.path and no
PYTHONPATH, so `import diffsynth` is the original's.

    from original_diffutoon import ensure_venv, write_weights, run_original
    python = ensure_venv()                         # ~/.cache/diffsynth-oracle/venv (or DIFFSYNTH_ORACLE_VENV)
    weights = write_weights(folder)                # {"sd": ..., "motion": ..., "controlnets": [...], ...}
    result = run_original(case_spec, out, python)  # {"tensors": {...}, "info": {...}}

A case spec (JSON-able): {"model_list": [paths], "controlnet_units": [{processor_id, model_path, scale}],
"textual_inversion_folder": path or None, "loras": [[path, alpha]], "frames": folder of PNGs (the cropped frames),
"noise": a safetensors file holding "noise" (frames, 4, h, w), "pipeline_inputs": {prompt, negative_prompt,
cfg_scale, clip_skip, denoising_strength, num_inference_steps, animatediff_batch_size, animatediff_stride,
unet_batch_size, controlnet_batch_size, cross_frame_attention}, "device": "cpu" | "cuda", "torch_dtype": "float32" |
"float16"}. `run_original` takes a list of such cases sharing one model load (cases with a LoRA go last: the LoRA is
merged into the loaded UNet).

Recorded per case (safetensors keys): `noise`, `latents.init` (x_T: noise, or the VAE-encoded frames noised to the
first timestep), `prompt.positive`, `prompt.negative` (1, tokens, 768), `eps.<step>.<window>` (the window's guided
ε, negative + cfg × (positive − negative)), `eps.<step>` (the frames' combined guided ε), `latents.<step>` (after the
step), `decoded` (the VAE's float output, frames × 3 × H × W in [-1, 1]), `frames` (uint8 frames as the original
saves them); info: timesteps, windows, timings (model load, each step, the whole call, in seconds).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ORIGINAL_PACKAGES = ["diffsynth==1.1.7", "transformers==4.46.2", "torch==2.14.1"]
DEFAULT_VENV = Path(os.environ.get("DIFFSYNTH_ORACLE_VENV", Path.home() / ".cache" / "diffsynth-oracle" / "venv"))
HERE = Path(__file__).resolve()

# The original's files are recognised by hashes of their keys and shapes: SD1.5's real files carry CLIP's
# position_ids, so the written checkpoint does too.
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


# --- the original's environment ---------------------------------------------------------------------------------

def _clean_env():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def venv_python(venv=DEFAULT_VENV):
    return Path(venv) / "bin" / "python"


def ensure_venv(venv=DEFAULT_VENV, quiet=True):
    """The original's interpreter, creating its venv from PyPI first if needed (diffsynth 1.1.7 with the
    transformers it pins and this machine's torch). Its downloader imports `modelscope` unconditionally; where
    modelscope cannot be imported a stub module takes its place (nothing is ever downloaded)."""
    venv = Path(venv)
    python = venv_python(venv)
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check = "import importlib.metadata as m; print(m.version('diffsynth'), m.version('transformers'))"
    probe = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=_clean_env(), cwd="/")
    if probe.returncode != 0 or probe.stdout.split() != ["1.1.7", "4.46.2"]:
        subprocess.run([str(python), "-m", "pip", "install", *(["-q"] if quiet else []), *ORIGINAL_PACKAGES],
                       check=True, env=_clean_env())
    importable = subprocess.run([str(python), "-c", "import modelscope"], capture_output=True, env=_clean_env(),
                                cwd="/")
    if importable.returncode != 0:
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
        stub = Path(site) / "modelscope"
        stub.mkdir(exist_ok=True)
        (stub / "__init__.py").write_text(
            '"""Offline stub: the original imports modelscope for downloads the oracle never makes."""\n\n\n'
            "def snapshot_download(*args, **kwargs):\n"
            '    raise RuntimeError("modelscope stub: downloads are disabled")\n')
    return python


# --- weights in the original's layouts (this project's interpreter) ---------------------------------------------

def _perturb_zeros(model, generator, skip=()):
    """Random init leaves some tensors at zero (ControlNet's zero convolutions, norm biases): give every all-zero
    parameter small seeded values so that each part of the model changes the output. `skip`: name prefixes left
    at zero."""
    import torch
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.numel() and not param.any() and not name.startswith(tuple(skip)):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def write_weights(folder, seed=0, controlnet_zero_conv_bias=False):
    """Random real-size weights, written once into `folder` (reused when present) in the original's layouts:
    `sd15.safetensors` (an LDM single-file SD1.5 checkpoint with CLIP's position_ids), `mm_sd_v15_v2.ckpt`,
    `control_v11f1e_sd15_tile.pth` and a second ControlNet (`control_v11p_sd15_canny.pth`), a UNet LoRA in the
    kohya layout (`lora.safetensors`, rank 4) and a textual-inversion embedding (`embeddings/badneg.safetensors`,
    2 tokens). Float16 on disk (both sides read them into float32 exactly).

    The ControlNets' zero-convolution biases are left at zero unless `controlnet_zero_conv_bias`: the original's
    loader drops or misplaces 10 of those 13 biases (see docs/coming_from_diffutoon.md), which would hide every
    other comparison behind that one bug. Returns {name: path}."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsynth.models import ldm_layout
    from diffsynth.models.convert import shipped_config

    folder = Path(folder)
    suffix = "_bias" if controlnet_zero_conv_bias else ""
    paths = {"sd": folder / "sd15.safetensors", "motion": folder / "mm_sd_v15_v2.ckpt",
             "controlnets": [folder / f"control_v11f1e_sd15_tile{suffix}.pth",
                             folder / f"control_v11p_sd15_canny{suffix}.pth"],
             "lora": folder / "lora.safetensors", "textual_inversion_folder": folder / "embeddings",
             "textual_inversion_keyword": "badneg"}
    marker = folder / f"COMPLETE{suffix}"
    if marker.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def config(name):
        return {k: v for k, v in shipped_config(name).items() if not k.startswith("_")}

    def half(state):
        return {key: (value.half() if value.is_floating_point() else value).contiguous()
                for key, value in state.items()}

    torch.manual_seed(seed)
    unet = None
    if not paths["sd"].exists() or not paths["lora"].exists():  # ~1 min to build: only when needed
        unet = UNet2DConditionModel(**config("sd15_unet")).eval()
        _perturb_zeros(unet, generator)
    if not paths["sd"].exists():
        vae = AutoencoderKL(**config("sd15_vae"))
        _perturb_zeros(vae, generator)
        text = CLIPTextModel(CLIPTextConfig(**config("sd15_text_encoder")))
        _perturb_zeros(text, generator)
        checkpoint = {**ldm_layout.unet_to_ldm(unet.state_dict(), unet.config),
                      **ldm_layout.vae_to_ldm(vae.state_dict(), vae.config),
                      **ldm_layout.clip_to_ldm(text.state_dict())}
        checkpoint[POSITION_IDS] = torch.arange(77)[None]
        save_file(half(checkpoint), paths["sd"])
        del vae, text, checkpoint
    if not paths["motion"].exists():
        adapter = MotionAdapter(**config("animatediff_motion_adapter"))
        _perturb_zeros(adapter, generator)
        torch.save(half(ldm_layout.motion_to_original(adapter.state_dict())), paths["motion"])
        del adapter
    zero_convs = () if controlnet_zero_conv_bias else ("controlnet_down_blocks", "controlnet_mid_block")
    for index, path in enumerate(paths["controlnets"]):
        if path.exists():
            continue
        torch.manual_seed(seed + 10 + index)
        controlnet = ControlNetModel(**config("sd15_controlnet"))
        _perturb_zeros(controlnet, generator, skip=[f"{name}." for name in zero_convs] + list(zero_convs))
        if not controlnet_zero_conv_bias:  # the zero convolutions' weights random, their biases zero
            for name, param in controlnet.named_parameters():
                if name.startswith(zero_convs) and name.endswith(".weight"):
                    with torch.no_grad():
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        torch.save(half(ldm_layout.controlnet_to_ldm(controlnet.state_dict(), controlnet.config)), path)
        del controlnet
    if not paths["lora"].exists():
        lora = {}
        for name, module in unet.named_modules():
            if name.endswith((".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
                              ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")):
                key = "lora_unet_" + name.replace(".", "_")
                out_features, in_features = module.weight.shape
                lora[f"{key}.lora_down.weight"] = torch.randn(4, in_features, generator=generator) / in_features ** 0.5
                lora[f"{key}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.02
                lora[f"{key}.alpha"] = torch.tensor(2.0)
        save_file(half(lora), paths["lora"])
    paths["textual_inversion_folder"].mkdir(exist_ok=True)
    embedding = paths["textual_inversion_folder"] / f"{paths['textual_inversion_keyword']}.safetensors"
    if not embedding.exists():
        save_file({"emb_params": (torch.randn(2, 768, generator=generator) * 0.02).half()}, embedding)
    marker.write_text("random weights written by bench/original_diffutoon.py\n")
    return paths


# --- running the original (this project's interpreter) ---------------------------------------------------------

def run_original(cases, out_folder, python=None, nice=10, timeout=None, threads=None):
    """Run the original on each case (a spec dict, see the module docstring) in one process of its venv, loading the
    models once (`threads`: its torch threads, default torch's). Returns [{"tensors": {...}, "info": {...}}] in the order given; raises with the worker's output
    on failure."""
    from safetensors.torch import load_file
    python = Path(python) if python else ensure_venv()
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    spec = out_folder / "cases.json"
    spec.write_text(json.dumps(cases, indent=1, default=str))
    command = [str(python), str(HERE), "worker", str(spec), str(out_folder)]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    env = _clean_env()
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/", timeout=timeout)
    (out_folder / "worker.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"the original failed (exit {result.returncode}); its log: {out_folder / 'worker.log'}\n"
                           + (result.stdout + result.stderr)[-3000:])
    return [{"tensors": load_file(out_folder / f"case{index}.safetensors"),
             "info": json.loads((out_folder / f"case{index}.json").read_text())} for index in range(len(cases))]


# --- the worker (the original's interpreter) --------------------------------------------------------------------

def _worker(spec_path, out_folder):
    import contextlib

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file

    import diffsynth
    from diffsynth.models.lora import LoRAFromCivitai
    from diffsynth.pipelines import sd_video
    from diffsynth.pipelines.sd_video import ControlNetConfigUnit, ModelManager, SDVideoPipeline
    assert "site-packages" in diffsynth.__file__, f"not the original diffsynth: {diffsynth.__file__}"

    cases = json.loads(Path(spec_path).read_text())
    out_folder = Path(out_folder)
    first = cases[0]
    dtype = getattr(torch, first.get("torch_dtype", "float32"))
    device = first.get("device", "cpu")
    torch.set_grad_enabled(False)

    @contextlib.contextmanager
    def cuda_calls_on(target):
        """The original's LoRA loader moves the up/down weights to "cuda" (in float16) unconditionally; on a machine
        without a GPU those calls go to `target` instead, still in float16."""
        original_to = torch.Tensor.to

        def to(self, *args, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = target
            return original_to(self, *args, **kwargs)
        torch.Tensor.to = to
        try:
            yield
        finally:
            torch.Tensor.to = original_to

    started = time.perf_counter()
    model_manager = ModelManager(torch_dtype=dtype, device=device)
    model_files = []
    for case in cases:
        for path in case["model_list"] + [unit["model_path"] for unit in case["controlnet_units"]]:
            if path not in model_files:
                model_files.append(path)
    model_manager.load_models(model_files)
    load_seconds = time.perf_counter() - started
    loras_loaded = []
    for index, case in enumerate(cases):
        loras = [tuple(lora) for lora in case.get("loras", [])]
        if loras[:len(loras_loaded)] != loras_loaded:  # a merged LoRA cannot be taken out again
            raise ValueError("cases with LoRAs must come last, each adding to the previous case's LoRAs")
        for path, alpha in loras[len(loras_loaded):]:
            with cuda_calls_on("cpu") if not torch.cuda.is_available() else contextlib.nullcontext():
                model_manager.load_lora(path, lora_alpha=alpha)
            loras_loaded.append((path, alpha))
        pipe = SDVideoPipeline.from_model_manager(model_manager, [
            ControlNetConfigUnit(processor_id=unit["processor_id"], model_path=unit["model_path"],
                                 scale=unit["scale"]) for unit in case["controlnet_units"]])
        folder = case.get("textual_inversion_folder")
        if folder:  # as the original's SDVideoPipelineRunner.load_pipeline
            pipe.prompter.load_textual_inversions(
                [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                 if name.endswith((".pt", ".bin", ".pth", ".safetensors"))])
        frames = [Image.open(path).convert("RGB") for path in sorted(Path(case["frames"]).glob("*.png"))]
        noise = load_file(case["noise"])["noise"]
        inputs = dict(case["pipeline_inputs"])

        recorded, timings, window_outputs, prompts, decoded = {}, {"load": load_seconds, "steps": []}, [], [], []
        pipe.generate_noise = lambda shape, seed=None, device="cpu", dtype=torch.float16: noise.to(device, dtype)
        encode_prompt = pipe.encode_prompt

        def recording_encode_prompt(prompt, *args, **kwargs):
            out = encode_prompt(prompt, *args, **kwargs)
            prompts.append(out["encoder_hidden_states"] if isinstance(out, dict) else out)
            return out
        pipe.encode_prompt = recording_encode_prompt
        lets_dance = sd_video.lets_dance

        def recording_lets_dance(*args, **kwargs):
            out = lets_dance(*args, **kwargs)
            window_outputs.append(out.float().cpu())
            return out
        sd_video.lets_dance = recording_lets_dance
        scheduler_step = pipe.scheduler.step
        step_clock = [time.perf_counter()]

        def recording_step(noise_pred, timestep, latents, to_final=False, **kwargs):
            out = scheduler_step(noise_pred, timestep, latents, to_final=to_final, **kwargs)
            if not to_final:
                k = len(timings["steps"])
                if k == 0:
                    recorded["latents.init"] = latents.float().cpu()
                recorded[f"eps.{k}"] = noise_pred.float().cpu()
                recorded[f"latents.{k}"] = out.float().cpu()
                now = time.perf_counter()
                timings["steps"].append(now - step_clock[0])
                step_clock[0] = now
            return out
        pipe.scheduler.step = recording_step
        vae_output_to_image = pipe.vae_output_to_image

        def recording_vae_output(vae_output):
            decoded.append(vae_output.float().cpu())
            return vae_output_to_image(vae_output)
        pipe.vae_output_to_image = recording_vae_output

        call_started = time.perf_counter()
        step_clock[0] = call_started
        try:
            output = pipe(**inputs, input_frames=frames, num_frames=len(frames), height=frames[0].height,
                          width=frames[0].width,
                          controlnet_frames=[frames] * len(case["controlnet_units"]) or None, seed=0,
                          progress_bar_cmd=lambda iterable: iterable)
        finally:
            sd_video.lets_dance = lets_dance
        timings["call"] = time.perf_counter() - call_started

        windows = []
        start, num_frames = 0, len(frames)
        while True:
            end = min(start + inputs["animatediff_batch_size"], num_frames)
            windows.append((start, end))
            if end == num_frames:
                break
            start += inputs["animatediff_stride"]
        steps = len(timings["steps"])
        assert len(window_outputs) == 2 * steps * len(windows), (len(window_outputs), steps, len(windows))
        cfg = inputs["cfg_scale"]
        for k in range(steps):  # each step sweeps every window with the positive prompt, then with the negative
            positive = window_outputs[2 * k * len(windows):(2 * k + 1) * len(windows)]
            negative = window_outputs[(2 * k + 1) * len(windows):(2 * k + 2) * len(windows)]
            for j, (pos, neg) in enumerate(zip(positive, negative)):
                recorded[f"eps.{k}.{j}"] = neg + cfg * (pos - neg)
        recorded["noise"] = noise.float()
        recorded["prompt.positive"], recorded["prompt.negative"] = (p.float().cpu() for p in prompts[:2])
        recorded["decoded"] = torch.cat(decoded)
        recorded["frames"] = torch.from_numpy(np.stack([np.asarray(image) for image in output]))
        save_file({key: value.clone().contiguous() for key, value in recorded.items()}, out_folder / f"case{index}.safetensors")
        timesteps = [int(t) for t in pipe.scheduler.timesteps]
        (out_folder / f"case{index}.json").write_text(json.dumps(
            {"timesteps": timesteps, "windows": windows, "timings": timings,
             "diffsynth": diffsynth.__file__, "torch": torch.__version__}, indent=1))
        print(f"case {index} done in {timings['call']:.1f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python original_diffutoon.py worker SPEC.json OUT_FOLDER (run by run_original)")
