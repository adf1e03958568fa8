"""Real model-file layouts, offline: tiny models written in the layouts users' files have (A1111/LDM single-file
SD1.5 .safetensors and .ckpt with EMA keys, AnimateDiff mm_*.ckpt, ControlNet v1.1 .pth), loaded through the same
code as real files, must give the same outputs as the diffusers folders they were written from."""


import pytest
import torch

from diffsynth.errors import UserError
from diffsynth.models import loader
from diffsynth.models.loader import BASE, CONTROLNET, MOTION, ModelStore, detect_kind


def models_config(model_list, controlnets=(), **extra):
    from diffsynth.config import ModelsConfig
    units = [{"processor_id": "tile", "model_path": str(path), "scale": 0.5} for path in controlnets]
    return ModelsConfig(model_list=[str(p) for p in model_list], controlnet_units=units, device="cpu",
                        torch_dtype="float32", **extra)


def test_kinds_are_detected_from_contents(tiny):
    assert detect_kind(tiny.files["sd_safetensors"]) == BASE
    assert detect_kind(tiny.files["sd_ckpt"]) == BASE
    assert detect_kind(tiny.files["motion"]) == MOTION
    assert detect_kind(tiny.files["controlnet_tile"]) == CONTROLNET
    renamed = tiny.root / "files" / "mm_looks_like_a_motion_module.safetensors"
    from safetensors.torch import save_file

    from diffsynth.models.checkpoint import read_state_dict
    save_file({k: v.contiguous() for k, v in read_state_dict(tiny.files["controlnet_tile"]).items()}, renamed)
    assert detect_kind(renamed) == CONTROLNET


@pytest.mark.parametrize("form", ["sd_safetensors", "sd_ckpt"])
def test_single_file_base_matches_folder(tiny, form):
    folder = ModelStore(models_config([tiny.folders["stable_diffusion"]]))
    single = ModelStore(models_config([tiny.files[form]]))
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    with torch.no_grad():
        a = folder.unet(sample, 500, encoder_hidden_states=text).sample
        b = single.unet(sample, 500, encoder_hidden_states=text).sample
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(folder.vae.encode(image).latent_dist.mean, single.vae.encode(image).latent_dist.mean,
                                   atol=1e-5, rtol=1e-5)
        latent = torch.randn(1, 4, 4, 4)
        torch.testing.assert_close(folder.vae.decode(latent).sample, single.vae.decode(latent).sample,
                                   atol=1e-5, rtol=1e-5)
        ids = folder.tokenizer("a girl walking", padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert ids.tolist() == single.tokenizer("a girl walking", padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids.tolist()
        ha = folder.text_encoder(ids, output_hidden_states=True).hidden_states
        hb = single.text_encoder(ids, output_hidden_states=True).hidden_states
        for x, y in zip(ha, hb):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_single_file_controlnet_and_motion_match_folders(tiny):
    folder = ModelStore(models_config([tiny.folders["stable_diffusion"], tiny.folders["motion_adapter"]],
                                      [tiny.folders["controlnet_tile"]]))
    single = ModelStore(models_config([tiny.files["motion"], tiny.files["sd_safetensors"]],  # any order
                                      [tiny.files["controlnet_tile"]]))
    assert single.has_motion_module and single.motion_max_frames == 32
    torch.manual_seed(1)
    sample, text, cond = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 32), torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        da, ma = folder.controlnets[0](sample, 300, encoder_hidden_states=text, controlnet_cond=cond,
                                       return_dict=False)
        db, mb = single.controlnets[0](sample, 300, encoder_hidden_states=text, controlnet_cond=cond,
                                       return_dict=False)
        for x, y in zip(list(da) + [ma], list(db) + [mb]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        video = sample.reshape(1, 4, 4, 8, 8).permute(0, 2, 1, 3, 4)
        a = folder.unet(video, 300, encoder_hidden_states=text).sample
        b = single.unet(video, 300, encoder_hidden_states=text).sample
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clip_tokenizer_is_shipped_and_exact():
    from diffsynth.models.convert import clip_tokenizer
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    # the ids openai/clip-vit-large-patch14 gives
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd2_shaped_file_is_refused_with_one_line(tiny, tmp_path):
    from safetensors.torch import save_file

    from diffsynth.models.checkpoint import read_state_dict
    state = read_state_dict(tiny.files["sd_safetensors"])
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    state[key] = torch.zeros(state[key].shape[0], 1024)
    path = tmp_path / "wrong.safetensors"
    save_file(state, path)
    (tmp_path / "wrong.safetensors.config.json").write_text(
        (tiny.files["sd_safetensors"].parent / "tiny_sd15.safetensors.config.json").read_text())
    store = ModelStore(models_config([path]))
    with pytest.raises(UserError, match="does not fit an SD1.5") as error:
        store.unet  # noqa: B018
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_missing_and_unknown_files_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(UserError, match="model file not found: .*nothing.safetensors.*SD1.5 checkpoint"):
        detect_kind(tmp_path / "nothing.safetensors")
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(3), "bar": torch.zeros(2)}, junk)
    with pytest.raises(UserError, match="cannot tell what model .*junk.safetensors is: expected .*SD1.5 checkpoint"):
        detect_kind(junk)
    with pytest.raises(UserError, match="junk.safetensors is: expected a ControlNet v1.1 file.*controlnet_units.0"):
        detect_kind(junk, ("ControlNet",), "models.controlnet_units.0.model_path")


def test_controlnet_listed_as_base_is_a_user_error(tiny):
    with pytest.raises(UserError, match="is a ControlNet; list it under models.controlnet_units"):
        ModelStore(models_config([tiny.files["controlnet_tile"]]))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": Evil()}}, path)
    with pytest.raises(UserError, match="refusing to load .*evil.ckpt.*arbitrary code"):
        detect_kind(path)
    with pytest.raises(UserError, match="refusing"):
        loader.read_state_dict(path)
    assert not marker.exists()


def test_vram_limit_levels_keep_idle_models_on_cpu():
    from diffsynth.models.loader import Offloader
    offloader = Offloader("cpu", level=1)
    models = {name: torch.nn.Linear(2, 2) for name in ("text_encoder", "unet", "controlnet0", "vae")}
    for name, model in models.items():
        offloader.register(name, model)
    assert offloader.resident == set()
    models["text_encoder"](torch.zeros(1, 2))
    assert offloader.resident == {"text_encoder"}
    models["controlnet0"](torch.zeros(1, 2))
    models["unet"](torch.zeros(1, 2))
    assert offloader.resident == {"controlnet0", "unet"}  # one group: the UNet and its ControlNets
    models["vae"](torch.zeros(1, 2))
    assert offloader.resident == {"vae"}
    strict = Offloader("cpu", level=2)
    for name, model in models.items():
        strict.register(name, torch.nn.Linear(2, 2) if name != "unet" else model)
    models["unet"](torch.zeros(1, 2))
    assert strict.resident == {"unet"}
    everything = Offloader("cpu", level=0)
    for name, model in models.items():
        everything.register(name, torch.nn.Linear(2, 2))
    assert everything.resident == set(models)
