"""Textual inversion and LoRA files in their real layouts, through the ModelStore."""


import pytest
import torch
from safetensors.torch import save_file

from diffsynth.models.loader import ModelStore
from diffsynth.stages.prompts import encode_chunks, token_chunks


def store(model_list, **extra):
    from diffsynth.config import ModelsConfig
    return ModelStore(ModelsConfig(model_list=[str(p) for p in model_list], device="cpu", torch_dtype="float32",
                                   **extra))


def test_textual_inversion_changes_the_embedding_exactly_where_its_keyword_stands(tiny, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    rows = torch.randn(3, 32)
    # A1111 .pt layout
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": "badhands", "step": 100},
               folder / "badHands.pt")
    save_file({"emb_params": torch.randn(2, 32)}, folder / "other_kw.safetensors")  # A1111 safetensors layout
    torch.save({"<x>": torch.randn(32)}, folder / "single.bin")  # diffusers layout
    plain = store([tiny.files["sd_safetensors"]])
    with_ti = store([tiny.files["sd_safetensors"]], textual_inversion_folder=str(folder))
    prompt_plain, prompt_ti = "a cat, b", "a cat, badHands b"
    chunks_plain = token_chunks(plain.tokenizer, prompt_plain, plain.expand_prompt)
    chunks_ti = token_chunks(with_ti.tokenizer, prompt_ti, with_ti.expand_prompt)
    ids = with_ti.textual_inversion_ids["badHands"]
    # CLIP's tokenizer lower-cases added tokens; the prompt keyword is matched as written (id-level insertion)
    assert with_ti.tokenizer.convert_ids_to_tokens(ids) == ["badhands_0", "badhands_1", "badhands_2"]
    position = chunks_ti[0].index(ids[0])
    assert chunks_ti[0][position:position + 3] == ids
    # the same sequence as the plain prompt with three tokens inserted
    assert chunks_ti[0][:position] + chunks_ti[0][position + 3:] == chunks_plain[0][:-3]
    # the token embeddings at those positions are the file's rows
    table = with_ti.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[ids], rows)
    # plain and TI prompts encode identically before the keyword; the keyword's rows differ
    a = encode_chunks(plain.text_encoder, chunks_plain, 1)
    b = encode_chunks(with_ti.text_encoder, chunks_ti, 1)
    torch.testing.assert_close(a[0, :position], b[0, :position], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0, position:position + 3], b[0, position:position + 3])
    # without the keyword both prompts give the same embedding (negative prompt path too)
    same = token_chunks(with_ti.tokenizer, prompt_plain, with_ti.expand_prompt)
    torch.testing.assert_close(encode_chunks(with_ti.text_encoder, same, 2), encode_chunks(plain.text_encoder,
                                                                                           chunks_plain, 2))
    assert len(with_ti.textual_inversion_ids["single"]) == 1 and len(with_ti.textual_inversion_ids["other_kw"]) == 2


def _kohya_lora(unet, text_encoder, rank=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lora, targets = {}, {}
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.proj_in", "up_blocks.1.resnets.0.conv1"]
    modules = dict(unet.named_modules())
    for name in names:
        weight = modules[name].weight
        key = "lora_unet_" + name.replace(".", "_")
        if weight.ndim == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * 0.1
        else:
            down = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
            up = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
        lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"] = down, up
        lora[key + ".alpha"] = torch.tensor(1.0)
        targets[name] = (down, up, 1.0 / rank)
    te_name = "encoder.layers.0.self_attn.q_proj"
    weight = dict(text_encoder.named_modules())[te_name].weight
    down, up = torch.randn(rank, weight.shape[1], generator=generator), torch.randn(weight.shape[0], rank,
                                                                                   generator=generator)
    key = "lora_te_text_model_" + te_name.replace(".", "_")
    lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"] = down, up  # no alpha: scale 1
    return lora, targets


def test_lora_alpha_zero_is_a_no_op_and_alpha_one_matches_a_hand_merge(tiny, tmp_path):
    base = store([tiny.files["sd_safetensors"]])
    lora, targets = _kohya_lora(base.unet, base.text_encoder)
    path = tmp_path / "style_lora.safetensors"
    save_file(lora, path)
    zero = store([path, tiny.files["sd_safetensors"]], lora_alphas=[0.0])
    for (name, a), (_, b) in zip(base.unet.state_dict().items(), zero.unet.state_dict().items()):
        assert torch.equal(a, b), name
    one = store([tiny.files["sd_safetensors"], path], lora_alphas=[1.0])
    merged = {name: p.clone() for name, p in base.unet.state_dict().items()}
    for name, (down, up, scale) in targets.items():
        delta = (up.flatten(1) @ down.flatten(1)).reshape(merged[name + ".weight"].shape)
        merged[name + ".weight"] += scale * delta
    got = one.unet.state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-6)
    changed = [n for n in merged if not torch.equal(base.unet.state_dict()[n], got[n])]
    assert sorted(changed) == sorted(n + ".weight" for n in targets)
    te_base = base.text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    te_one = one.text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.weight"]
    down = lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    up = lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    torch.testing.assert_close(te_one, te_base + up @ down, atol=1e-5, rtol=1e-5)


def test_lora_alphas_must_match_the_loras(tiny, tmp_path):
    from diffsynth.errors import UserError
    path = tmp_path / "l.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 1, 1, 1)}, path)
    with pytest.raises(UserError, match="lora_alphas has 0 value"):
        store([tiny.files["sd_safetensors"], path])


def test_lora_diffutoon_convention_ignores_the_file_alpha_and_the_text_encoder(tiny, tmp_path):
    """The original Diffutoon merges W += lora_alpha × up·down (the file's alpha ignored) into the UNet only."""
    base = store([tiny.files["sd_safetensors"]])
    lora, targets = _kohya_lora(base.unet, base.text_encoder)
    path = tmp_path / "style_lora.safetensors"
    save_file(lora, path)
    original = store([tiny.files["sd_safetensors"], path], lora_alphas=[0.7], lora_convention="diffutoon")
    got = original.unet.state_dict()
    for name, (down, up, _) in targets.items():
        expected = base.unet.state_dict()[name + ".weight"] + 0.7 * (up.flatten(1) @ down.flatten(1)).reshape(
            got[name + ".weight"].shape)
        torch.testing.assert_close(got[name + ".weight"], expected, atol=1e-6, rtol=1e-6)
    for name, value in base.text_encoder.state_dict().items():
        assert torch.equal(original.text_encoder.state_dict()[name], value), name
    kohya = store([tiny.files["sd_safetensors"], path], lora_alphas=[0.7])
    assert kohya.identity("unet") != original.identity("unet")
