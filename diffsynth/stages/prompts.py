"""Stage 4, prompts: the positive and negative text embeddings, stored once.

clip_skip k takes the output of the k-th text-encoder layer from the end, then the final layer norm. Prompts longer
than 77 tokens are encoded in 77-token chunks, concatenated along the sequence: by default 75 tokens each wrapped in
start/end tokens (A1111, ComfyUI), or with `long_prompts: diffutoon` raw 77-token slices of the whole tokenized
prompt (the original Diffutoon); the shorter prompt is padded with
chunks of the empty prompt so both halves of classifier-free guidance have the same length. Textual-inversion
keywords (in either prompt) expand to their n tokens `kw_0 … kw_{n-1}`, inserted as token ids.
"""

import torch

from ..cache import tensors_to_bytes
from .base import Stage

CHUNK = 75  # tokens per chunk between the start and end tokens


def prompt_ids(tokenizer, text, expand=None):
    """Token ids of a prompt (no start/end tokens); `expand(text)` gives [str | [ids]] pieces (textual inversion)."""
    pieces = expand(text) if expand is not None else [text]
    ids = []
    for piece in pieces:
        if isinstance(piece, str):
            if piece.strip():
                ids += tokenizer(piece, add_special_tokens=False, truncation=False).input_ids
        else:
            ids += list(piece)
    return ids


def token_chunks(tokenizer, text, expand=None):
    ids = prompt_ids(tokenizer, text, expand)
    chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [[tokenizer.bos_token_id] + chunk + [tokenizer.eos_token_id] + [pad] * (CHUNK - len(chunk))
            for chunk in chunks]


def raw_slices(tokenizer, text, expand=None, length=77):
    """The original Diffutoon's long prompts: the whole prompt tokenized once (start token … end token), padded to
    a multiple of 77 and cut into raw 77-token slices (only the first slice starts with the start token)."""
    ids = [tokenizer.bos_token_id] + prompt_ids(tokenizer, text, expand) + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (-len(ids) % length)
    return [ids[i:i + length] for i in range(0, len(ids), length)]


@torch.no_grad()
def encode_chunks(text_encoder, chunks, clip_skip):
    ids = torch.tensor(chunks, device=getattr(text_encoder, "device", None))
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_layer_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    return final_layer_norm(hidden).float().reshape(1, -1, hidden.shape[-1]).cpu()


class PromptStage(Stage):
    name = "prompts"
    version = "1"

    def params(self):
        inputs = self.ctx.config.pipeline.pipeline_inputs
        params = {"prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "clip_skip": inputs.clip_skip,
                  "models": self.ctx.models.identity("text")}
        if inputs.long_prompts != "chunks":
            params["long_prompts"] = inputs.long_prompts
        return params

    def unit_keys(self):
        return ["embeddings.safetensors"]

    def compute(self, key):
        inputs = self.ctx.config.pipeline.pipeline_inputs
        tokenizer, encoder = self.ctx.models.tokenizer, self.ctx.models.text_encoder
        expand = getattr(self.ctx.models, "expand_prompt", None)
        split = raw_slices if inputs.long_prompts == "diffutoon" else token_chunks
        positive = split(tokenizer, inputs.prompt, expand)
        negative = split(tokenizer, inputs.negative_prompt, expand)
        empty = split(tokenizer, "")
        length = max(len(positive), len(negative))
        positive += empty * (length - len(positive))
        negative += empty * (length - len(negative))
        return tensors_to_bytes({
            "positive": encode_chunks(encoder, positive, inputs.clip_skip),
            "negative": encode_chunks(encoder, negative, inputs.clip_skip),
        }), None
