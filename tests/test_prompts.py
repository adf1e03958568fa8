"""Long prompts: 75-token chunks each wrapped in start/end tokens (the default, as A1111/ComfyUI), or the original
Diffutoon's raw 77-token slices of the prompt tokenized once (`long_prompts: diffutoon`)."""

from transformers import CLIPTokenizer

from diffsynth.stages.prompts import prompt_ids, raw_slices, token_chunks


def test_long_prompt_chunking_conventions(demo_assets):
    tokenizer = CLIPTokenizer.from_pretrained(demo_assets / "models" / "stable_diffusion" / "tokenizer")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = "a girl walking in a garden at night, " * 6  # the demo tokenizer: one token per character (no spaces)
    ids = prompt_ids(tokenizer, text)
    assert 150 < len(ids) < 225

    chunks = token_chunks(tokenizer, text)
    assert len(chunks) == 3 and all(len(chunk) == 77 and chunk[0] == bos for chunk in chunks)
    assert chunks[0][1:76] == ids[:75] and chunks[0][76] == eos and chunks[1][1:76] == ids[75:150]

    slices = raw_slices(tokenizer, text)
    assert all(len(piece) == 77 for piece in slices)
    flat = [token for piece in slices for token in piece]
    assert flat[:len(ids) + 2] == [bos] + ids + [eos]  # one start token, then the prompt straight through
    assert slices[1][0] == ids[76] != bos and len(slices) == -(-(len(ids) + 2) // 77)

    short = "a girl"  # under 75 tokens both conventions are the same single chunk
    assert raw_slices(tokenizer, short) == token_chunks(tokenizer, short)
