"""Prompt weighting in A1111 syntax: `(word:1.3)`, `(word)` ×1.1, `[word]` ÷1.1, nesting, escapes. A plain prompt
encodes bit-identically to the encoding before weighting existed; weighted tokens' embeddings are multiplied by
their weight and each chunk is rescaled to its original mean (the A1111 rule)."""

import types

import pytest
import torch
from helpers import small_config

from diffsynth.cache import bytes_to_tensors
from diffsynth.config import parse_config
from diffsynth.models.loader import ModelStore
from diffsynth.stages.prompts import (
    EMBEDDINGS_KEY,
    PromptStage,
    chunk_tokens,
    encode_chunks,
    has_weighting_syntax,
    parse_prompt_weights,
    prompt_ids,
    token_chunks,
    weighted_prompt_ids,
)


def close_pieces(actual, expected):
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [weight for _, weight in actual] == pytest.approx([weight for _, weight in expected], rel=1e-12)


def test_parser_weights_nesting_and_escapes():
    close_pieces(parse_prompt_weights("a (cat:1.3) dog"), [("a ", 1.0), ("cat", 1.3), (" dog", 1.0)])
    close_pieces(parse_prompt_weights("(cat)"), [("cat", 1.1)])
    close_pieces(parse_prompt_weights("((cat))"), [("cat", 1.1 * 1.1)])
    close_pieces(parse_prompt_weights("[cat]"), [("cat", 1 / 1.1)])
    close_pieces(parse_prompt_weights("[[cat]] x"), [("cat", 1 / 1.1 / 1.1), (" x", 1.0)])
    # Nesting multiplies: the explicit weight applies to everything inside it, brackets inside it too.
    close_pieces(parse_prompt_weights("(a (b:1.5) c:0.5)"), [("a ", 0.5), ("b", 0.75), (" c", 0.5)])
    close_pieces(parse_prompt_weights("((a:1.2) b)"), [("a", 1.32), (" b", 1.1)])
    # Escapes are literal brackets; an unmatched closing bracket and a colon that is no weight stay literal text.
    assert parse_prompt_weights(r"a \(cat\) \[x\] \\") == [("a (cat) [x] \\", 1.0)]
    assert parse_prompt_weights("a) b: c]") == [("a) b: c]", 1.0)]
    # A bracket left open weights the rest of the prompt, as in A1111.
    close_pieces(parse_prompt_weights("a (b c"), [("a ", 1.0), ("b c", 1.1)])
    assert not has_weighting_syntax("a toon cat, style: anime, 4k")
    assert has_weighting_syntax("a (cat)") and has_weighting_syntax(r"a \(cat\)")


def test_weights_follow_their_tokens_into_chunks_and_slices():
    tokenizer = types.SimpleNamespace(bos_token_id=900, eos_token_id=901, pad_token_id=902)
    ids = list(range(100))
    weights = [1.0] * 70 + [2.0] * 30  # tokens 70..99 weighted: the last 5 of chunk 0 and the first 25 of chunk 1
    id_chunks, weight_chunks = chunk_tokens(tokenizer, ids, weights)
    assert [len(chunk) for chunk in id_chunks] == [77, 77] and [len(chunk) for chunk in weight_chunks] == [77, 77]
    assert id_chunks[0][71:76] == [70, 71, 72, 73, 74] and weight_chunks[0][71:76] == [2.0] * 5
    assert weight_chunks[0][:71] == [1.0] * 71 and weight_chunks[0][76] == 1.0  # start token, plain tokens, end
    assert id_chunks[1][1:26] == list(range(75, 100)) and weight_chunks[1][1:26] == [2.0] * 25
    assert weight_chunks[1][26:] == [1.0] * 51  # end token and padding weigh 1


@pytest.fixture(scope="module")
def prompt_models(demo_assets, tmp_path_factory):
    config = parse_config(small_config(demo_assets, tmp_path_factory.mktemp("weights") / "run"))
    return config, ModelStore(config.models)


def prompt_stage(config, models, **pipeline_inputs):
    config = config.model_copy(deep=True)
    for name, value in pipeline_inputs.items():
        setattr(config.pipeline.pipeline_inputs, name, value)
    return PromptStage(types.SimpleNamespace(config=config, models=models))


@torch.no_grad()
def encode_as_before_weighting(models, text, num_chunks, clip_skip):
    """The prompts stage's encoding before weighting existed, spelled out: the prompt tokenized whole, 75-token
    chunks wrapped in start/end tokens and padded, empty-prompt chunks up to `num_chunks`, clip_skip, layer norm."""
    tokenizer, encoder = models.tokenizer, models.text_encoder
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = [[tokenizer.bos_token_id] + ids[i:i + 75] + [tokenizer.eos_token_id] + [pad] * (75 - len(ids[i:i + 75]))
              for i in range(0, len(ids), 75)] or [[tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad] * 75]
    chunks += [[tokenizer.bos_token_id, tokenizer.eos_token_id] + [pad] * 75] * (num_chunks - len(chunks))
    hidden = encoder(torch.tensor(chunks), output_hidden_states=True).hidden_states[-clip_skip]
    final_layer_norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    return final_layer_norm(hidden).float().reshape(1, -1, hidden.shape[-1])


def test_plain_prompts_encode_bit_identically_to_before(prompt_models):
    config, models = prompt_models
    positive = "a toon cat walking in a garden at night, soft light, " * 3  # over 75 tokens: two chunks
    negative = "blurry, lowres"
    stage = prompt_stage(config, models, prompt=positive, negative_prompt=negative, clip_skip=2)
    assert stage.unit_keys() == [EMBEDDINGS_KEY]  # the cache layout of old
    assert "prompt_weighting" not in stage.params()  # so the fingerprint (and old renders' caches) are unchanged
    embeddings = bytes_to_tensors(stage.compute(EMBEDDINGS_KEY)[0])
    num_chunks = embeddings["positive"].shape[1] // 77
    assert num_chunks == 2 and embeddings["negative"].shape == embeddings["positive"].shape
    assert torch.equal(embeddings["positive"], encode_as_before_weighting(models, positive, 2, 2))
    assert torch.equal(embeddings["negative"], encode_as_before_weighting(models, negative, 2, 2))


WEIGHTED_TEXT, PLAIN_TEXT = "a girl (walking:1.3) in a [garden]", "a girl walking in a garden"


def weighted_positions(tokenizer):
    """Chunk positions (+1: the start token) of the tokens of "walking" (×1.3), "garden" (÷1.1) and the rest."""
    ids, weights = weighted_prompt_ids(tokenizer, WEIGHTED_TEXT)
    assert ids == prompt_ids(tokenizer, PLAIN_TEXT)  # the same tokens, only weighted
    walking = [1 + i for i, w in enumerate(weights) if w == pytest.approx(1.3)]
    garden = [1 + i for i, w in enumerate(weights) if w == pytest.approx(1 / 1.1)]
    assert len(walking) >= 3 and len(garden) >= 3
    return walking, garden, [i for i in range(77) if i not in walking + garden]


def plain_and_weighted(config, models):
    plain = encode_chunks(models.text_encoder, token_chunks(models.tokenizer, PLAIN_TEXT), 2)[0].double()
    stage = prompt_stage(config, models, prompt=WEIGHTED_TEXT, negative_prompt="")
    assert stage.params()["prompt_weighting"] == "a1111"  # brackets now mean weights: a new fingerprint
    return plain, bytes_to_tensors(stage.compute(EMBEDDINGS_KEY)[0])["positive"][0].double()


def test_weighted_tokens_scale_by_their_weight_and_the_chunk_keeps_its_mean(demo_assets, prompt_models):
    """The A1111 rule on a text encoder whose final layer norm has a bias (as real CLIP's), so chunks have a mean."""
    config, _ = prompt_models
    models = ModelStore(config.models)  # its own text encoder, changed below
    torch.manual_seed(0)
    with torch.no_grad():
        models.text_encoder.final_layer_norm.bias.copy_(0.3 + 0.2 * torch.randn(32))
    walking, garden, others = weighted_positions(models.tokenizer)
    plain, weighted = plain_and_weighted(config, models)

    # z × weight per token, then × (mean before / mean after) for the whole chunk.
    token_weights = torch.ones(77, dtype=torch.float64)
    token_weights[walking], token_weights[garden] = 1.3, 1 / 1.1
    rescale = plain.mean() / (plain * token_weights[:, None]).mean()
    assert rescale.item() < 0.999  # more up- than down-weighting: the chunk is scaled back down
    torch.testing.assert_close(weighted[walking], plain[walking] * 1.3 * rescale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighted[garden], plain[garden] / 1.1 * rescale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighted[others], plain[others] * rescale, rtol=1e-5, atol=1e-6)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)


def test_a_chunk_with_numerically_zero_mean_is_weighted_without_rescale(prompt_models):
    """The tiny models' final layer norm has no bias: every token is centred, the chunk mean is rounding noise and
    the rescale is skipped; the weights alone apply."""
    config, models = prompt_models
    walking, garden, others = weighted_positions(models.tokenizer)
    plain, weighted = plain_and_weighted(config, models)
    assert abs(plain.mean().item()) < 1e-6
    torch.testing.assert_close(weighted[walking], plain[walking] * 1.3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weighted[garden], plain[garden] / 1.1, rtol=1e-6, atol=1e-7)
    assert torch.equal(weighted[others], plain[others])


def test_escaped_brackets_are_the_literal_characters(prompt_models):
    config, models = prompt_models
    escaped = bytes_to_tensors(prompt_stage(config, models, prompt=r"a \(cat\)").compute(EMBEDDINGS_KEY)[0])
    literal_ids = prompt_ids(models.tokenizer, "a (cat)")
    assert weighted_prompt_ids(models.tokenizer, r"a \(cat\)") == (literal_ids, [1.0] * len(literal_ids))
    assert torch.equal(escaped["positive"], encode_as_before_weighting(models, "a (cat)", 1, 2))
