"""Weighted and long prompts (`sdxl.conditioning.encode_prompt`) against an independent implementation of
AUTOMATIC1111's rules written here over transformers' CLIP text models and tokenizer: chunks of 75 tokens, the
comma backtrack, BREAK, emphasis ("Original" mean restoration, "No norm", ComfyUI's), textual-inversion vectors,
and the pooled output of the first bigG chunk. Plus: a prompt without syntax is exactly today's conditioning, and
a context repeated to a common chunk count conditions the U-Net as the context itself does."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize, tiny_components

from sdxl.adapters.embeddings import Embedding
from sdxl.checkpoints.load import load_clip_transformers
from sdxl.conditioning import encode_prompt, encode_prompts, prompt_chunks, repeat_chunks
from sdxl.models.tokenizer import EOT, SOT, write_transformers_files
from sdxl.prompts import parse_attention

transformers = pytest.importorskip("transformers")

LONG = ", ".join(f"word{i} thing{i}" for i in range(40)) + " and a long tail without commas " * 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(our Components, transformers CLIP-L, transformers bigG, transformers tokenizer)."""
    root = tmp_path_factory.mktemp("clip")
    hf = {}
    for name, width, act, proj in (("text_encoder", 32, "quick_gelu", False), ("text_encoder_2", 64, "gelu", True)):
        config = transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=width,
            bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)
        cls = transformers.CLIPTextModelWithProjection if proj else transformers.CLIPTextModel
        hf[name] = randomize(cls(config), seed=len(hf) + 1, scale=0.3)
        hf[name].save_pretrained(root / name)
    parts = tiny_components("base")
    parts.text_encoder = load_clip_transformers(root / "text_encoder")
    parts.text_encoder_2 = load_clip_transformers(root / "text_encoder_2")
    write_transformers_files(root / "tok", pad_token="<|endoftext|>")
    return parts, hf["text_encoder"], hf["text_encoder_2"], transformers.CLIPTokenizer.from_pretrained(root / "tok")


# ---------------------------------------------------------------------------------------------
# The reference: A1111's rules, written out plainly.


def reference_chunks(tokenizer, text, emphasis="original", embeddings=None):
    """[(token ids (77), weights (77), [(offset, embedding)])] by A1111's `tokenize_line`."""
    embeddings = embeddings or {}
    names = sorted(((tokenizer(n, add_special_tokens=False).input_ids, e) for n, e in embeddings.items()),
                   key=lambda c: -len(c[0]))
    fragments = [[text, 1.0]] if emphasis == "none" else parse_attention(text)
    chunks, tokens, weights, fixes, comma = [], [], [], [], -1

    def close():
        nonlocal tokens, weights, fixes, comma
        pad = 75 - len(tokens)
        chunks.append(([SOT] + tokens + [EOT] * pad + [EOT], [1.0] + weights + [1.0] * pad + [1.0],
                       [(o + 1, e) for o, e in fixes]))
        tokens, weights, fixes, comma = [], [], [], -1

    for fragment, weight in fragments:
        if fragment == "BREAK" and weight == -1:
            close()
            continue
        ids = tokenizer(fragment, add_special_tokens=False).input_ids
        pos = 0
        while pos < len(ids):
            if ids[pos] == 267:
                comma = len(tokens)
            elif len(tokens) == 75 and comma != -1 and 75 - comma <= 20:
                moved = (tokens[comma + 1:], weights[comma + 1:])
                tokens, weights = tokens[:comma + 1], weights[:comma + 1]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == 75:
                close()
            match = next(((n, e) for n, e in names if ids[pos:pos + len(n)] == n), None)
            if match is None:
                tokens.append(ids[pos])
                weights.append(weight)
                pos += 1
                continue
            n, e = match
            if len(tokens) + len(e.clip_l) > 75:
                close()
            fixes.append((len(tokens), e))
            tokens += [0] * len(e.clip_l)
            weights += [weight] * len(e.clip_l)
            pos += len(n)
    if tokens or not chunks:
        close()
    return chunks


def reference_encode(model, chunks, which, emphasis="original"):
    hidden, pooled = [], None
    for i, (ids, weights, fixes) in enumerate(chunks):
        ids = torch.tensor([ids])
        if which == "clip_g":  # open_clip pads with 0 after the end token
            end = ids[0].tolist().index(EOT)
            ids[0, end + 1:] = 0
        embeds = model.get_input_embeddings()(ids)
        for offset, e in fixes:
            vectors = getattr(e, which)
            embeds[0, offset:offset + len(vectors)] = vectors
        out = _run(model, ids, embeds)
        z = out.hidden_states[-2]
        w = torch.tensor(weights)[None, :, None]
        if emphasis == "comfy":
            empty = _run(model, torch.tensor([[SOT] + [EOT] * 76]) if which == "clip_l"
                         else torch.tensor([[SOT, EOT] + [0] * 75]), None).hidden_states[-2]
            z = torch.where(w != 1, empty + (z - empty) * w, z)
        elif emphasis in ("original", "no_norm"):
            scaled = z * w
            if emphasis == "original":
                scaled = scaled * (z.mean() / scaled.mean())
            z = scaled
        hidden.append(z)
        if i == 0 and which == "clip_g":
            pooled = out.text_embeds
    return torch.cat(hidden, dim=1), pooled


def _run(model, ids, embeds):
    """transformers' CLIP with token vectors in place: its own embedding module, patched for the call."""
    if embeds is None:
        return model(input_ids=ids, output_hidden_states=True)
    embedding = model.get_input_embeddings()
    original = embedding.forward
    embedding.forward = lambda _ids: embeds
    try:
        return model(input_ids=ids, output_hidden_states=True)
    finally:
        embedding.forward = original


def reference(models, text, emphasis="original", embeddings=None):
    _, hf_l, hf_g, tok = models
    chunks = reference_chunks(tok, text, emphasis, embeddings)
    h_l, _ = reference_encode(hf_l, chunks, "clip_l", emphasis)
    h_g, pooled = reference_encode(hf_g, chunks, "clip_g", emphasis)
    return torch.cat([h_l, h_g], dim=-1), pooled


def check(models, text, emphasis="original", embeddings=None, chunks=None):
    parts = models[0]
    with torch.no_grad():
        context, pooled = encode_prompt(parts, text, text, emphasis=emphasis, embeddings=embeddings)
        want, want_pooled = reference(models, text, emphasis, embeddings)
    assert context.shape == want.shape, (context.shape, want.shape)
    if chunks is not None:
        assert context.shape[1] == 77 * chunks
    torch.testing.assert_close(context, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pooled, want_pooled, atol=2e-5, rtol=1e-4)
    return context


# ---------------------------------------------------------------------------------------------


def test_a_prompt_without_syntax_is_todays_conditioning(models):
    parts = models[0]
    for text in ("a red fox in the snow, detailed photograph", "", "wow!"):
        with torch.no_grad():
            new = encode_prompt(parts, text, text)
            old = encode_prompts(parts.text_encoder, parts.text_encoder_2, [text], [text])
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), text


@pytest.mark.parametrize("text, chunks", [
    ("a (red:1.3) fox, [blurry], ((detailed)) snow", 1),
    ("a fox BREAK in the snow BREAK", 2),  # a BREAK at the end starts no empty chunk
    (LONG, None),
    ("(" + LONG + ":0.8), [end]", None),
    ("wow! a (bang!:1.2)", 1),
])
def test_weighted_and_long_prompts_match_a1111s_rules(models, text, chunks):
    context = check(models, text, chunks=chunks)
    if text is LONG:
        assert context.shape[1] >= 77 * 3


def test_the_comma_backtrack_moves_words_to_the_next_chunk(models):
    # 74 tokens, a comma, then more: the chunk fills within 20 tokens of the comma, so the words after it move on
    text = " ".join(["cat"] * 70) + ", a b c d e f g"
    chunks = prompt_chunks(text)
    assert len(chunks) == 2
    assert chunks[0].tokens[71] == 267 and chunks[0].tokens[72:] == [EOT] * 5  # cut after the comma
    check(models, text, chunks=2)


@pytest.mark.parametrize("emphasis", ["no_norm", "comfy", "none"])
def test_other_emphasis_modes(models, emphasis):
    check(models, "a (red:1.5) fox, [blurry] (snow)", emphasis=emphasis)


def test_literal_text_with_emphasis_none(models):
    parts = models[0]
    with torch.no_grad():
        literal = encode_prompt(parts, "(red:1.5)", "(red:1.5)", emphasis="none")[0]
        weighted = encode_prompt(parts, "(red:1.5)", "(red:1.5)")[0]
    assert not torch.allclose(literal, weighted)


def test_embeddings_by_name_and_as_comfyui_writes_them(models):
    g = torch.Generator().manual_seed(3)
    emb = Embedding("mystyle", torch.randn(3, 32, generator=g), torch.randn(3, 64, generator=g))
    check(models, "a photo in mystyle, (mystyle:1.2)", embeddings={"mystyle": emb})
    parts = models[0]
    with torch.no_grad():
        bare = encode_prompt(parts, "a mystyle fox", "a mystyle fox", embeddings={"mystyle": emb})
        comfy = encode_prompt(parts, "a embedding:mystyle fox", "a embedding:mystyle fox", embeddings={"mystyle": emb})
        plain = encode_prompt(parts, "a mystyle fox", "a mystyle fox")
    assert torch.equal(bare[0], comfy[0]) and not torch.allclose(bare[0], plain[0])
    with pytest.raises(ValueError, match="embedding:nothere: no such embedding"):
        encode_prompt(parts, "embedding:nothere", "x", embeddings={"mystyle": emb})


def test_a_repeated_context_conditions_the_unet_as_the_context_does(one_thread):
    parts = tiny_components("base", randomized=True)
    unet, c = parts.unet, parts.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77 * 2, c.context_dim, generator=g)
    y = torch.randn(1, c.adm_in_channels, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        once, thrice = unet(x, t, context, y), unet(x, t, repeat_chunks(context, 6), y)
    torch.testing.assert_close(thrice, once, atol=1e-5, rtol=1e-4)
