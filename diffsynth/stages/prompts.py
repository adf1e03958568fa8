"""Stage 4, prompts: the positive and negative text embeddings, stored once.

clip_skip k takes the output of the k-th text-encoder layer from the end, then the final layer norm. Prompts longer
than 77 tokens are encoded in 77-token chunks, concatenated along the sequence: by default 75 tokens each wrapped in
start/end tokens (A1111, ComfyUI), or with `long_prompts: diffutoon` raw 77-token slices of the whole tokenized
prompt (the original Diffutoon); shorter prompts are padded with chunks of the empty prompt so every prompt (both
halves of classifier-free guidance, every keyframe of a prompt travel) has the same length. With `diffutoon` only the
keyframes of one half are padded to each other (travel interpolates between them): each CFG half keeps its own
length, as the original encodes and attends to each prompt at its own length (the denoise stage then runs the halves
apart). Textual-inversion
keywords (in either prompt) expand to their n tokens `kw_0 … kw_{n-1}`, inserted as token ids.

Prompt weighting, A1111 syntax: `(word:1.3)` multiplies the word's weight by 1.3, `(word)` by 1.1, `[word]` divides
it by 1.1; brackets nest (their factors multiply) and `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters. Each
token's embedding is multiplied by its weight, then each 77-token chunk is rescaled so its mean is what it was (the
A1111 rule). A prompt without weighting syntax is encoded exactly as without this feature (bit-identical).

Prompt travel: a prompt may be a mapping {frame index: prompt} (frames relative to the rendered range's first
frame). Then each keyframe prompt is its own unit (`positive.000120.safetensors`, `negative.000000.safetensors`; a
plain-string half has the single key 0) and `PromptTimeline` gives each frame's embedding when a sliding window is
built: linear interpolation between the two keys around the frame over the whole gap between them; before the first
key the first key's embedding, after the last the last's. Two plain-string prompts keep the single unit
`embeddings.safetensors` of old.
"""

import bisect
import re

import torch

from ..cache import tensors_to_bytes
from .base import Stage

CHUNK = 75  # tokens per chunk between the start and end tokens
EMBEDDINGS_KEY = "embeddings.safetensors"  # the single unit when both prompts are plain strings
HALVES = ("negative", "positive")  # classifier-free guidance's batch order

# --- prompt weighting (A1111's parse_prompt_attention) -----------------------------------------------------------

ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1
# One token of weighting syntax per match: an escaped character, an opening bracket, ":1.3)" (a weight that closes a
# round bracket), a closing bracket, a run of plain text, or a lone colon.
WEIGHT_SYNTAX = re.compile(r"""
    \\[()\[\]\\]            # escaped bracket or backslash: a literal character
  | \\                      # a lone backslash: literal
  | \(                      # opens a round bracket
  | \[                      # opens a square bracket
  | :\s*([+-]?[.\d]+)\s*\)  # an explicit weight, closing a round bracket
  | \)                      # closes a round bracket (× 1.1)
  | ]                       # closes a square bracket (÷ 1.1)
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight: literal
""", re.VERBOSE)


def parse_prompt_weights(text):
    """[(text, weight)] pieces of a prompt with A1111 weighting syntax, neighbours of equal weight merged. An
    unmatched closing bracket is literal text; a bracket left open weights everything after it (as A1111)."""
    pieces = []  # [text, weight], mutable: closing a bracket multiplies the weights of the pieces since it opened
    open_round, open_square = [], []  # indices into pieces where each still-open bracket started

    def multiply_from(first, factor):
        for piece in pieces[first:]:
            piece[1] *= factor

    for match in WEIGHT_SYNTAX.finditer(text):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif explicit_weight is not None and open_round:
            multiply_from(open_round.pop(), float(explicit_weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:
            pieces.append([token, 1.0])
    for first in open_round:
        multiply_from(first, ROUND_BRACKET_FACTOR)
    for first in open_square:
        multiply_from(first, SQUARE_BRACKET_FACTOR)
    merged = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def has_weighting_syntax(text):
    """Whether the parser changes anything in `text` (brackets, weights or escapes); plain prompts skip it."""
    return parse_prompt_weights(text) != [(text, 1.0)]


# --- tokens ------------------------------------------------------------------------------------------------------

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


def weighted_prompt_ids(tokenizer, text, expand=None):
    """(token ids, one weight per token) of a prompt with weighting syntax. A plain prompt is tokenized whole, so
    its ids are exactly `prompt_ids(text)`; a weighted one piece by piece (as A1111)."""
    if not has_weighting_syntax(text):
        ids = prompt_ids(tokenizer, text, expand)
        return ids, [1.0] * len(ids)
    ids, weights = [], []
    for piece_text, weight in parse_prompt_weights(text):
        piece_ids = prompt_ids(tokenizer, piece_text, expand)
        ids += piece_ids
        weights += [weight] * len(piece_ids)
    return ids, weights


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chunk_tokens(tokenizer, ids, weights):
    """75-token chunks, each wrapped in start/end tokens and padded to 77: (id chunks, weight chunks); the start,
    end and padding tokens weigh 1."""
    starts = range(0, len(ids), CHUNK) if ids else [0]
    pad = _pad_id(tokenizer)
    id_chunks, weight_chunks = [], []
    for first in starts:
        chunk_ids, chunk_weights = ids[first:first + CHUNK], weights[first:first + CHUNK]
        padding = CHUNK - len(chunk_ids)
        id_chunks.append([tokenizer.bos_token_id] + chunk_ids + [tokenizer.eos_token_id] + [pad] * padding)
        weight_chunks.append([1.0] + chunk_weights + [1.0] + [1.0] * padding)
    return id_chunks, weight_chunks


def slice_tokens(tokenizer, ids, weights, length=77):
    """The original Diffutoon's long prompts: the whole prompt (start token … end token), padded to a multiple of
    77 and cut into raw 77-token slices (only the first slice starts with the start token): (id slices, weights)."""
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    weights = [1.0] + weights + [1.0]
    padding = -len(ids) % length
    ids, weights = ids + [_pad_id(tokenizer)] * padding, weights + [1.0] * padding
    return ([ids[i:i + length] for i in range(0, len(ids), length)],
            [weights[i:i + length] for i in range(0, len(weights), length)])


def token_chunks(tokenizer, text, expand=None):
    return chunk_tokens(tokenizer, *weighted_prompt_ids(tokenizer, text, expand))[0]


def raw_slices(tokenizer, text, expand=None, length=77):
    return slice_tokens(tokenizer, *weighted_prompt_ids(tokenizer, text, expand), length)[0]


# --- embeddings --------------------------------------------------------------------------------------------------

def apply_token_weights(hidden, weights):
    """The A1111 rule: each token's embedding × its weight, then each chunk rescaled to its original mean (so the
    weights shift emphasis between tokens without changing the chunk's overall magnitude).
    hidden: (chunks, 77, width); weights: (chunks, 77).

    A chunk whose mean is numerically zero (a final layer norm without bias, as in the tiny test models, centres
    every token) has no meaningful mean to restore: the ratio would be rounding noise, so it is left unrescaled."""
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights.to(hidden.dtype).unsqueeze(-1)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    numerically_zero = weighted_mean.abs() <= 1e-5 * weighted.abs().mean(dim=(1, 2), keepdim=True)
    rescale = torch.where(numerically_zero, torch.ones_like(weighted_mean), original_mean / weighted_mean)
    return weighted * rescale


@torch.no_grad()
def encode_chunks(text_encoder, chunks, clip_skip, weights=None):
    """(1, chunks × 77, width) float32 embeddings of token-id chunks; `weights` (one per token, as the chunks) are
    applied with the A1111 rule unless they are all 1 (then the result is exactly the unweighted one)."""
    ids = torch.tensor(chunks, device=getattr(text_encoder, "device", None))
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    final_layer_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
    hidden = final_layer_norm(hidden).float()
    if weights is not None and any(weight != 1.0 for chunk in weights for weight in chunk):
        hidden = apply_token_weights(hidden, torch.tensor(weights, device=hidden.device))
    return hidden.reshape(1, -1, hidden.shape[-1]).cpu()


def keyframe_prompts(prompt):
    """{frame index: prompt text} of a prompt field: a plain string holds from frame 0."""
    return {0: prompt} if isinstance(prompt, str) else dict(sorted(prompt.items()))


def keyframe_unit_key(half, frame):
    return f"{half}.{frame:06d}.safetensors"


class PromptStage(Stage):
    name = "prompts"
    version = "1"

    def __init__(self, ctx, num_frames=None):
        super().__init__(ctx)
        self.num_frames = num_frames  # the rendered range's length: keys past it are warned about

    def input_warnings(self):
        """A prompt-travel key past the rendered range's last frame: the frames before it blend toward it and never
        reach it (a preview of the first part of a longer travel, or a typo): say how far they get."""
        if not self.travels or not self.num_frames:
            return []
        last, lines = self.num_frames - 1, []
        for half, field in (("positive", "prompt"), ("negative", "negative_prompt")):
            keys = sorted(self.keyframes(half))
            for key in (k for k in keys if k > last):
                before, after, t = interpolation_between(keys, last)
                weight = (1 - t if before == key else 0.0) + (t if after == key else 0.0)
                if weight >= 1:
                    continue  # the only key in range's reach: it holds for every frame, as a plain prompt would
                reach = "it is never used" if weight == 0 else f"frame {last} gets {weight:.1%} of it, no frame more"
                lines.append(f"prompt travel key {key} of pipeline.pipeline_inputs.{field} is past the rendered "
                             f"range's last frame ({last}, counted from data.input_frames.start_frame_id): {reach}; "
                             f"move the key to {last} or below (or render more frames) for that prompt to be reached")
        return lines

    @property
    def inputs_config(self):
        return self.ctx.config.pipeline.pipeline_inputs

    @property
    def travels(self):
        """Whether either prompt is a {frame: prompt} mapping (one unit per keyframe prompt)."""
        return not (isinstance(self.inputs_config.prompt, str) and isinstance(self.inputs_config.negative_prompt, str))

    def keyframes(self, half):
        """{frame index: prompt text} of one CFG half ("positive" or "negative")."""
        inputs = self.inputs_config
        return keyframe_prompts(inputs.prompt if half == "positive" else inputs.negative_prompt)

    def all_prompt_texts(self):
        return [text for half in HALVES for text in self.keyframes(half).values()]

    def params(self):
        inputs = self.inputs_config
        params = {"prompt": inputs.prompt, "negative_prompt": inputs.negative_prompt, "clip_skip": inputs.clip_skip,
                  "models": self.ctx.models.identity("text")}
        if inputs.long_prompts != "chunks":
            params["long_prompts"] = inputs.long_prompts
            # Each CFG half padded only to its own longest keyframe (before: both halves to the longest prompt).
            # Only here, so `chunks` configs keep their fingerprints.
            params["padding"] = "per_half"
        # Only where it changes something, so plain prompts keep their fingerprint (and cached renders): runs made
        # before weighting existed encoded brackets as literal text.
        if any(has_weighting_syntax(text) for text in self.all_prompt_texts()):
            params["prompt_weighting"] = "a1111"
        return params

    def unit_keys(self):
        if not self.travels:
            return [EMBEDDINGS_KEY]
        return [keyframe_unit_key(half, frame) for half in HALVES for frame in self.keyframes(half)]

    def _tokens(self, text):
        """(id chunks, weight chunks) of one prompt text, in the configured long-prompt convention."""
        tokenizer = self.ctx.models.tokenizer
        expand = getattr(self.ctx.models, "expand_prompt", None)
        split = slice_tokens if self.inputs_config.long_prompts == "diffutoon" else chunk_tokens
        return split(tokenizer, *weighted_prompt_ids(tokenizer, text, expand))

    def _encode(self, text, num_chunks):
        """(1, num_chunks × 77, width) embeddings of one prompt, padded with chunks of the empty prompt."""
        id_chunks, weight_chunks = self._tokens(text)
        empty_ids, empty_weights = self._tokens("")
        padding = num_chunks - len(id_chunks)
        return encode_chunks(self.ctx.models.text_encoder, id_chunks + empty_ids * padding,
                             self.inputs_config.clip_skip, weight_chunks + empty_weights * padding)

    def num_chunks(self, half):
        """The chunk count every prompt of CFG half `half` is padded to. `chunks`: the longest prompt's of both
        halves, so both halves and every keyframe line up (one UNet batch). `diffutoon`: the longest of this half's
        keyframes (travel interpolates between them), so each half keeps its own length, as in the original."""
        texts = (self.keyframes(half).values() if self.inputs_config.long_prompts == "diffutoon"
                 else self.all_prompt_texts())
        return max(len(self._tokens(text)[0]) for text in texts)

    def compute(self, key):
        if key == EMBEDDINGS_KEY:
            return tensors_to_bytes({half: self._encode(self.keyframes(half)[0], self.num_chunks(half))
                                     for half in HALVES}), None
        half, frame = key.split(".")[:2]
        embedding = self._encode(self.keyframes(half)[int(frame)], self.num_chunks(half))
        return tensors_to_bytes({"embedding": embedding}), None


def interpolation_between(keys, index):
    """(key before, key after, t) for frame `index` among the sorted keyframe indices `keys`: its embedding is
    (1 - t) × before + t × after. At a key, (key, key, 0); outside the keys, the nearest key holds."""
    if index <= keys[0]:
        return keys[0], keys[0], 0.0
    if index >= keys[-1]:
        return keys[-1], keys[-1], 0.0
    after = bisect.bisect_right(keys, index)
    before_key, after_key = keys[after - 1], keys[after]
    if index == before_key:  # at a key: that key alone (a window reads only the keys it uses)
        return before_key, before_key, 0.0
    return before_key, after_key, (index - before_key) / (after_key - before_key)


class PromptTimeline:
    """Each frame's text embeddings, for a stage that reads the prompts stage: which prompt units a range of frames
    needs (`reads`), and those frames' embeddings (`load`), interpolated when the window is built so nothing per
    frame is ever stored or held beyond one window."""

    def __init__(self, prompt_stage):
        self.stage = prompt_stage
        self.keys = {half: sorted(prompt_stage.keyframes(half)) for half in HALVES}

    def unit_keys_for(self, frames):
        """The prompt units frames `frames` (indices) read."""
        if not self.stage.travels:
            return [EMBEDDINGS_KEY]
        needed = []
        for half in HALVES:
            frames_keys = set()
            for index in frames:
                before, after, _ = interpolation_between(self.keys[half], index)
                frames_keys.update((before, after))
            needed += [keyframe_unit_key(half, frame) for frame in sorted(frames_keys)]
        return needed

    def reads(self, frames):
        return [(self.stage, key) for key in self.unit_keys_for(frames)]

    def load(self, reader, frames):
        """A `FrameEmbeddings` for frames `frames`, its prompt units read through `reader` (a Stage)."""
        units = {key: reader.read_tensors(self.stage, key) for key in self.unit_keys_for(frames)}
        return FrameEmbeddings(self, units)


class FrameEmbeddings:
    """The embeddings of one window's frames: `frame_embeddings(half, indices)` is (len(indices), tokens, width)."""

    def __init__(self, timeline, units):
        self.timeline, self.units = timeline, units

    def __call__(self, half, indices):
        if not self.timeline.stage.travels:  # one embedding for every frame, as a view
            return self.units[EMBEDDINGS_KEY][half].expand(len(indices), -1, -1)
        return torch.cat([self.frame(half, index) for index in indices])

    def frame(self, half, index):
        """(1, tokens, width): frame `index`'s embedding; exactly the key's at a key, the mean halfway between."""
        before, after, t = interpolation_between(self.timeline.keys[half], index)
        start = self.units[keyframe_unit_key(half, before)]["embedding"]
        if t == 0.0:
            return start
        end = self.units[keyframe_unit_key(half, after)]["embedding"]
        return (1 - t) * start + t * end
