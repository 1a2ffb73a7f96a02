"""Tests for sdxl.models.tokenizer against transformers' CLIPTokenizer.

The reference tokenizers are built from the same BPE data, laid out as the SDXL
diffusers repos ship them (tokenizer/ and tokenizer_2/: vocab.json, merges.txt,
special_tokens_map.json, tokenizer_config.json). The vocab.json / merges.txt
derivation below is written independently of the module under test.
"""

import gzip
import html
import json
import random
from importlib import resources

import ftfy
import pytest
import regex
import torch

from sdxl.models.tokenizer import EOT, SOT, VOCAB_SIZE, Tokenizer, clip_g_tokenizer, clip_l_tokenizer

transformers = pytest.importorskip("transformers")

LONG = [
    "a very long prompt " * 30,
    ", ".join(f"detail {i}" for i in range(60)),
    "こんにちは世界、" * 40,
    "masterpiece, best quality, " + "ultra-detailed intricate filigree, " * 20 + "the end",
]

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "An astronaut riding a horse on Mars, 4k, highly detailed, trending on ArtStation",
    "Hello, World! How are you???",
    "wow!!! ok?! !",
    "price: $1,234.56 (approx.) -- 50% off; 3.14159",
    "room 101, 2024-01-31 12:30",
    "it's they're we've I'm you'll he'd don't can't",
    "IT'S THEY'RE WE'VE",
    "rock'n'roll o'clock 'quoted' ''s x's'",
    "'s 't 're 've 'm 'll 'd",
    "café naïve résumé façade Ångström",
    "Cafe\u0301 nai\u0308ve",  # decomposed accents: NFC composes them
    "São Paulo, München, Kraków, İstanbul",
    "ΟΔΟΣ Σ σς ΣΑΣ",  # final sigma
    "Straße STRASSE ß",
    "日本語のテキスト、東京タワー",
    "中文提示词：一只可爱的猫",
    "한국어 텍스트",
    "Привет, мир! Съешь же ещё",
    "مرحبا بالعالم",
    "हिन्दी नमस्ते",  # vowel signs are marks, neither letters nor digits
    "🙂🐱🚀 emoji 👍🏽 family 👨\u200d👩\u200d👧",
    "&amp; &lt;tag&gt; &#39;single&#39; &quot;double&quot;",
    "Tom &amp;amp; Jerry",
    "&nbsp;&copy; 2024 &#x263A;",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\n  mixed \t whitespace",
    "nbsp\u00a0ideographic\u3000space\u2028line\u0085nel",
    "",
    " \t\n ",
    "zero\u200bwidth \ufeffbom",
    "x\x1cy\x1fz",  # not whitespace for `tokenizers`, though Python's str.isspace says so
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "xqzvbnmwrtplkj qqqqqqqqqqqq zzzzzzz aaaaaaaaaaaaaaaa",
    "antidisestablishmentarianism hyperrealistic unrealengine octanerender",
    "(masterpiece:1.2), [best quality], {ultra-detailed}, <lora:foo:0.8>",
    "a_b-c/d\\e|f~g`h^i",
    "“Curly quotes” and ‘single’ — em dash – en dash … ellipsis",
    "ﬁne ﬂower ＡＢＣ１２３",
    "mojibake: cafÃ© donâ€™t",
    "1234567890 0.5 1e-9 ½ ² Ⅳ ①",
    "UPPER lower MiXeD CaSe",
    "e.g. i.e. U.S.A. Mr. Smith's",
    "hello</w>world",
    "<|startoftext|>a<|endoftext|>b",
    "x <|startoftext|>'s <|endoftext|>'s",
    "!!<|startoftext|>!!",
    "<|STARTOFTEXT|> <|EndOfText|>",
    *LONG,
]


# --- reference tokenizers -------------------------------------------------------------


def _gpt2_byte_chars() -> list[str]:
    # printable latin-1 bytes keep their character, the rest are shifted past 255, in byte order
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, shift = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    # vocabulary order: the kept bytes first, then the shifted ones
    return [chars[b] for b in sorted(keep)] + [chars[b] for b in range(256) if b not in keep]


def _write_hf_files(folder, pad_token: str) -> None:
    raw = resources.files("sdxl.data").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = _gpt2_byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "unk_token": added("<|endoftext|>"), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_tokenizers")
    _write_hf_files(root / "tokenizer", pad_token="<|endoftext|>")
    _write_hf_files(root / "tokenizer_2", pad_token="!")
    load = transformers.CLIPTokenizer.from_pretrained
    return load(root / "tokenizer"), load(root / "tokenizer_2")


def _hf_ids(hf, texts, max_length=77) -> torch.Tensor:
    out = hf(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out["input_ids"]


def _assert_rows_equal(ours: torch.Tensor, ref: torch.Tensor, texts) -> None:
    assert ours.shape == ref.shape
    bad = [(t, ours[i].tolist(), ref[i].tolist()) for i, t in enumerate(texts) if not torch.equal(ours[i], ref[i])]
    assert not bad, "\n".join(f"{t!r}\n  ours: {o}\n  hf:   {r}" for t, o, r in bad[:5])


# --- equality with transformers --------------------------------------------------------


def diffusers_tokenizer_2() -> Tokenizer:
    """diffusers' tokenizer_2 exactly: our clip_g_tokenizer but for "!", which diffusers reads as its pad token."""
    return Tokenizer(max_length=77, pad_token_id=0)


@pytest.mark.parametrize("encoder", [1, 2])
def test_matches_transformers(hf_tokenizers, encoder):
    ours = (clip_l_tokenizer, diffusers_tokenizer_2)[encoder - 1]()
    hf = hf_tokenizers[encoder - 1]
    _assert_rows_equal(ours(CORPUS), _hf_ids(hf, CORPUS), CORPUS)


@pytest.mark.parametrize("encoder", [1, 2])
def test_encode_matches_transformers_without_truncation(hf_tokenizers, encoder):
    ours = (clip_l_tokenizer, diffusers_tokenizer_2)[encoder - 1]()
    hf = hf_tokenizers[encoder - 1]
    for text in CORPUS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_bpe_on_many_words(hf_tokenizers):
    # every merge's token as a word, plus random letter soup that falls apart into many pieces
    hf = hf_tokenizers[0]
    rng = random.Random(0)
    vocab = [t for t in hf.get_vocab() if t.endswith("</w>") and not t.startswith("<|")]
    words = [hf.convert_tokens_to_string([t]) for t in rng.sample(vocab, 3000)]
    words += ["".join(rng.choices("abcdefghijklmnopqrstuvwxyzéüñ", k=rng.randint(1, 20))) for _ in range(1000)]
    text = " ".join(words)
    assert clip_l_tokenizer().encode(text) == hf.encode(text, add_special_tokens=False)


def test_custom_max_length_matches_transformers(hf_tokenizers):
    texts = ["a photo of a cat", "one two three four five six seven eight nine ten", ""]
    _assert_rows_equal(Tokenizer(max_length=8)(texts), _hf_ids(hf_tokenizers[0], texts, max_length=8), texts)


def test_vocabulary_size(hf_tokenizers):
    assert VOCAB_SIZE == 49408
    assert clip_l_tokenizer().vocab_size == len(hf_tokenizers[0]) == 49408
    assert hf_tokenizers[0].convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [SOT, EOT] == [49406, 49407]


def test_known_clip_ids():
    # the example from OpenAI's CLIP README / HF docs: "a photo of a cat"
    assert clip_l_tokenizer()("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


# --- shapes, padding, truncation -------------------------------------------------------


def test_shapes_and_dtype():
    tok = clip_l_tokenizer()
    one = tok("a cat")
    assert one.shape == (1, 77) and one.dtype == torch.int64
    batch = tok(["a cat", "a dog", ""])
    assert batch.shape == (3, 77) and batch.dtype == torch.int64
    assert torch.equal(batch[0], one[0])
    assert tok(("a cat",)).shape == (1, 77)


def test_padding_conventions(hf_tokenizers):
    assert hf_tokenizers[0].pad_token_id == EOT and hf_tokenizers[1].pad_token_id == 0
    n = len(clip_l_tokenizer().encode("a cat"))
    l_row, g_row = clip_l_tokenizer()("a cat")[0], clip_g_tokenizer()("a cat")[0]
    assert l_row[0] == g_row[0] == SOT
    assert torch.equal(l_row[: n + 2], g_row[: n + 2]) and l_row[n + 1] == EOT
    assert (l_row[n + 2 :] == EOT).all()
    assert (g_row[n + 2 :] == 0).all()
    # the empty prompt is just start + end
    assert clip_g_tokenizer()("")[0, :3].tolist() == [SOT, EOT, 0]


@pytest.mark.parametrize("text", LONG)
def test_truncation_keeps_end_token_last(text):
    for tok in (clip_l_tokenizer(), clip_g_tokenizer()):
        ids = tok.encode(text)
        assert len(ids) > 75
        row = tok(text)[0]
        assert row[0] == SOT and row[-1] == EOT
        assert row[1:-1].tolist() == ids[:75]


def test_exclamation_marks_are_punctuation_for_clip_g_as_in_open_clip(hf_tokenizers):
    # diffusers' tokenizer_2 never splits its pad token's text "!", so every "!" becomes the pad id 0
    assert diffusers_tokenizer_2().encode("wow!!!")[-3:] == [0, 0, 0]
    assert hf_tokenizers[1].encode("wow!!!", add_special_tokens=False)[-3:] == [0, 0, 0]
    # ours reads it as open_clip (sgm, AUTOMATIC1111, ComfyUI) does: "!</w>" = 256, the same ids as CLIP ViT-L's
    assert clip_g_tokenizer().encode("wow!!!") == clip_l_tokenizer().encode("wow!!!")
    assert clip_g_tokenizer().encode("wow!!!") == Tokenizer(pad_token_id=0, cleaning="open_clip").encode("wow!!!")
    assert clip_l_tokenizer().encode("wow!!!") == hf_tokenizers[0].encode("wow!!!", add_special_tokens=False)
    assert 0 not in clip_l_tokenizer().encode("wow!!!") and 256 in clip_g_tokenizer().encode("a!")


def test_constructors_are_cached():
    assert clip_l_tokenizer() is clip_l_tokenizer()
    assert clip_g_tokenizer() is clip_g_tokenizer()


def test_bad_arguments():
    with pytest.raises(ValueError):
        Tokenizer(max_length=1)
    with pytest.raises(ValueError):
        Tokenizer(cleaning="nope")


# --- decode ---------------------------------------------------------------------------


def test_decode_matches_transformers(hf_tokenizers):
    hf = hf_tokenizers[0]
    texts = ["a photo of a cat", "Café naïve, 日本語 🙂 it's 3.5!", "tabs\tand  spaces"]
    for text, row in zip(texts, clip_l_tokenizer()(texts)):
        assert clip_l_tokenizer().decode(row) == hf.decode(row.tolist(), skip_special_tokens=True)
    # padding of the other encoder is dropped too
    assert clip_g_tokenizer().decode(clip_g_tokenizer()("a photo of a cat")) == "a photo of a cat"


# --- open_clip-style cleaning ----------------------------------------------------------


def _open_clip_clean(text: str) -> str:
    # open_clip's basic_clean + whitespace_clean + lower, written out
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def test_open_clip_mode_matches_transformers_on_cleaned_text(hf_tokenizers):
    # the special-token literals are matched differently by open_clip (see module docstring)
    hf = hf_tokenizers[0]
    ours = Tokenizer(cleaning="open_clip")
    for text in CORPUS:
        if "<|" in text:
            continue
        assert ours.encode(text) == hf.encode(_open_clip_clean(text), add_special_tokens=False), text


@pytest.mark.parametrize(
    "text, cleaned",
    [
        ("Tom &amp;amp; Jerry", "tom & jerry"),  # HTML entities (ftfy alone unescapes these)
        ("<b>Tom &amp;amp; Jerry</b>", "<b>tom & jerry</b>"),  # ftfy leaves text with "<" alone: html.unescape twice
        ("&#39;single&#39; &quot;double&quot;", "'single' \"double\""),
        ("“Curly quotes”", '"curly quotes"'),  # ftfy uncurls quotes
        ("ﬁne ＡＢＣ", "fine abc"),  # ligatures and full-width forms
        ("mojibake: cafÃ©", "mojibake: café"),
        ("ΟΔΟΣ", "οδος"),  # str.lower() applies the final-sigma rule
    ],
)
def test_documented_cleaning_differences(hf_tokenizers, text, cleaned):
    hf = hf_tokenizers[0]
    default, open_clip = clip_l_tokenizer(), Tokenizer(cleaning="open_clip")
    assert default.encode(text) == hf.encode(text, add_special_tokens=False)
    assert open_clip.encode(text) == hf.encode(cleaned, add_special_tokens=False)
    assert open_clip.encode(text) != default.encode(text)


def test_open_clip_mode_special_tokens_and_padding(hf_tokenizers):
    ours = Tokenizer(pad_token_id=0, cleaning="open_clip")
    # "!" is ordinary punctuation for open_clip, unlike diffusers' tokenizer_2
    assert ours.encode("wow!!!") == hf_tokenizers[0].encode("wow!!!", add_special_tokens=False)
    assert 0 not in ours.encode("wow!!!")
    # special-token text is recognised after lowercasing
    assert ours.encode("a <|EndOfText|> b") == ours.encode("a") + [EOT] + ours.encode("b")
    row = ours("a cat")[0]
    assert row[: len(ours.encode("a cat")) + 2].tolist() == [SOT, *ours.encode("a cat"), EOT]
    assert (row[len(ours.encode("a cat")) + 2 :] == 0).all()
