"""CLIP byte-level BPE tokenizer, as used by both SDXL text encoders.

SDXL has two text encoders, OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, and both
use the same 49,408-token vocabulary (data/bpe_simple_vocab_16e6.txt.gz, from
open_clip):

    ids 0..255        the 256 bytes, each drawn as a printable unicode character
    ids 256..511      the same 256 characters + '</w>' (a byte that ends a word)
    ids 512..49405    the first 48,894 merges of the file, in rank order
    49406, 49407      '<|startoftext|>', '<|endoftext|>'

A prompt becomes ids in three steps: clean the text, split it into words with
CLIP's regex (contractions, runs of letters, single digits, runs of other
symbols; whitespace is dropped), then run BPE on each word's UTF-8 bytes, the last
symbol of a word carrying '</w>'.

The two encoders differ only in what fills the sequence after the end token:
clip_l_tokenizer() pads with the end token 49407 and clip_g_tokenizer() pads with
0 (open_clip.tokenize pads with 0; diffusers' tokenizer_2 has pad_token "!", id 0).

Text cleaning: two references disagree, so there are two modes.

cleaning="transformers" (default) reproduces transformers' CLIPTokenizer (5.x, where
it is the `tokenizers`-backed fast tokenizer; CLIPTokenizerFast is an alias and the
ftfy-based slow tokenizer is gone) loaded from the SDXL tokenizer files, which is
what diffusers' SDXL pipelines use:
    * Unicode NFC, every whitespace run -> " ", lowercase character by character
      (so no final-sigma rule: "ΟΔΟΣ" -> "οδοσ"). No ftfy, no HTML unescaping:
      "&amp;" stays as the three words "&", "amp", ";".
    * Special-token text is never split. The pad token's text is matched in the
      raw prompt; '<|startoftext|>' / '<|endoftext|>' after lowercasing, except
      that an end token that is also the pad token is matched only in the raw
      prompt. (That is how transformers registers them from those files.) For
      diffusers' tokenizer_2 this means every "!" in a prompt becomes id 0, the pad
      token "!", rather than the ordinary "!</w>" (256) that open_clip produces;
      clip_g_tokenizer() reads "!" as open_clip does (pad_text_is_special=False),
      the one place where it differs from diffusers on purpose.
    * Special-token text that was not matched, e.g. "<|EndOfText|>" for clip_l, is
      split like ordinary text ("<|", "endoftext", "|>").

cleaning="open_clip" reproduces open_clip.tokenize (OpenAI CLIP's SimpleTokenizer),
which is what Stability's reference code (sgm) uses for the bigG encoder:
    * ftfy.fix_text (fixes mojibake, curly quotes -> straight, ligatures and
      full-width forms -> plain, HTML entities unless the text contains "<"),
      html.unescape twice ("<b>&amp;amp;" -> "<b>&"), whitespace runs -> " ",
      strip, str.lower().
    * '<|startoftext|>' / '<|endoftext|>' in any case become the special ids; the
      pad token has no special meaning.

Both modes keep at most max_length - 2 BPE ids, between the start and end tokens.
"""

from __future__ import annotations

import gzip
import html
import json
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import regex
import torch

SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894: the merges file holds more than CLIP uses

Cleaning = Literal["transformers", "open_clip"]

_SPECIAL_TEXT = {"<|startoftext|>": SOT, "<|endoftext|>": EOT}
# CLIP's pre-tokenizer. Both originals list the special tokens first, so they win over
# the symbol-run alternative; open_clip also matches case-insensitively.
_WORDS = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
_WORD_RE = regex.compile(_WORDS)
_WORD_RE_IGNORECASE = regex.compile(_WORDS, regex.IGNORECASE)
# The `regex` module's \s is Unicode White_Space, like the Oniguruma \s in `tokenizers`
# (the stdlib `re` would also count \x1c-\x1f as whitespace).
_WHITESPACE_RE = regex.compile(r"\s+")


@lru_cache(maxsize=None)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table, in vocabulary order.

    Printable latin-1 bytes stand for themselves; the other 68 (controls, space,
    soft hyphen, ...) are moved to chr(256 + n) so that every token is a visible
    string without whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class _BPE:
    """The vocabulary, the merge ranks and a per-word cache, shared by all tokenizers."""

    def __init__(self, merges: list[tuple[str, str]]):
        byte_chars = list(_byte_to_unicode().values())
        tokens = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges] + list(_SPECIAL_TEXT)
        assert len(tokens) == VOCAB_SIZE, len(tokens)
        self.tokens = tokens  # id -> token string
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        # str.translate tables between latin-1 text (one char per byte) and token characters
        self.encode_bytes = dict(_byte_to_unicode())
        self.decode_bytes = {ord(c): b for b, c in _byte_to_unicode().items()}
        self.cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenized word (cleaned text, not yet byte-encoded)."""
        ids = self.cache.get(word)
        if ids is None:
            ids = self.cache[word] = self._merge(word)
        return ids

    def _merge(self, word: str) -> tuple[int, ...]:
        chars = word.encode("utf-8").decode("latin-1").translate(self.encode_bytes)
        parts = [*chars[:-1], chars[-1] + "</w>"]
        while len(parts) > 1:
            # apply the best-ranked (earliest learned) merge everywhere in the word, left to right
            pairs = list(zip(parts, parts[1:]))
            ranks = [self.ranks.get(p, NUM_MERGES) for p in pairs]
            best = min(ranks)
            if best == NUM_MERGES:
                break
            first, second = pairs[ranks.index(best)]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.ids[p] for p in parts)


@lru_cache(maxsize=None)
def _load_bpe() -> _BPE:
    data = resources.files("sdxl.data").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # line 0 is a version header; CLIP keeps only the first NUM_MERGES merges
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    return _BPE(merges)


def _literal_splitter(literals: dict[str, int]) -> regex.Pattern:
    """Regex that splits text around exact occurrences of `literals` (kept, as a group)."""
    return regex.compile("(" + "|".join(regex.escape(s) for s in sorted(literals, key=len, reverse=True)) + ")")


def _split_on(text: str, literals: dict[str, int], splitter: regex.Pattern) -> list[str | int]:
    """Split text around exact occurrences of `literals`, which become their ids."""
    if not any(s in text for s in literals):  # the common case: no regex pass
        return [text]
    return [literals[s] if i % 2 else s for i, s in enumerate(splitter.split(text)) if s]


def _open_clip_clean(text: str) -> str:
    import ftfy  # only this mode needs it

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


class Tokenizer:
    """CLIP tokenizer: text -> (B, max_length) int64 ids, [SOT] + BPE ids + [EOT] + padding."""

    def __init__(self, max_length: int = 77, pad_token_id: int = EOT, cleaning: Cleaning = "transformers",
                 pad_text_is_special: bool = True):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        if not 0 <= pad_token_id < VOCAB_SIZE:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary")
        if cleaning not in ("transformers", "open_clip"):
            raise ValueError(f"cleaning must be 'transformers' or 'open_clip', got {cleaning!r}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.cleaning = cleaning
        self._bpe = _load_bpe()
        # transformers never splits special-token text; see the module docstring for which
        # literal is matched before and which after normalization
        pad_text = self._bpe.tokens[pad_token_id]
        # pad_text_is_special=False: the pad token's text is ordinary text (open_clip's "!" is "!</w>", 256)
        self._raw_specials = {pad_text: pad_token_id} if pad_text_is_special or pad_token_id == EOT else {}
        self._normalized_specials = {s: i for s, i in _SPECIAL_TEXT.items() if s != pad_text}
        self._raw_splitter = _literal_splitter(self._raw_specials)
        self._normalized_splitter = _literal_splitter(self._normalized_specials)

    @property
    def vocab_size(self) -> int:
        return len(self._bpe.tokens)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no start/end tokens, no truncation."""
        if self.cleaning == "open_clip":
            return self._encode_words(_open_clip_clean(text), _WORD_RE_IGNORECASE)
        ids: list[int] = []
        for chunk in _split_on(text, self._raw_specials, self._raw_splitter):
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            chunk = unicodedata.normalize("NFC", chunk)
            chunk = _WHITESPACE_RE.sub(" ", chunk)
            # `tokenizers` lowercases char by char, Python's lower() has a final-sigma rule
            chunk = chunk.replace("Σ", "σ").lower()
            for part in _split_on(chunk, self._normalized_specials, self._normalized_splitter):
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids.extend(self._encode_words(part, _WORD_RE))
        return ids

    def _encode_words(self, text: str, word_re: regex.Pattern) -> list[int]:
        ids: list[int] = []
        for word in word_re.findall(text):
            if word not in _SPECIAL_TEXT:
                ids.extend(self._bpe(word))
            elif self.cleaning == "open_clip":
                ids.append(_SPECIAL_TEXT[word])
            else:
                # special text transformers did not match (e.g. "<|EndOfText|>" for clip_l):
                # its ByteLevel pre-tokenizer splits it again, like plain text
                for piece in ("<|", word[2:-2], "|>"):
                    ids.extend(self._bpe(piece))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize one prompt or a batch into a (B, max_length) int64 tensor (B = 1 for a str)."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = [SOT, *self.encode(text)[: self.max_length - 2], EOT]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a sequence of ids. SOT is dropped; decoding stops at the first EOT (what follows is padding)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        tokens = []
        for i in ids:
            if i == EOT:
                break
            if i != SOT:
                tokens.append(self._bpe.tokens[i])
        # token characters -> latin-1 chars (one per byte); '</w>' ends a word with a plain space,
        # which no byte maps to, so it survives the translation
        text = "".join(tokens).replace("</w>", " ").translate(self._bpe.decode_bytes)
        return text.encode("latin-1").decode("utf-8", errors="replace").strip()


@lru_cache(maxsize=None)
def clip_l_tokenizer() -> Tokenizer:
    """Tokenizer for SDXL text encoder 1 (OpenAI CLIP ViT-L/14): pads with the end token."""
    return Tokenizer(max_length=77, pad_token_id=EOT)


@lru_cache(maxsize=None)
def clip_g_tokenizer() -> Tokenizer:
    """Tokenizer for SDXL text encoder 2 (OpenCLIP ViT-bigG/14): pads with 0, as open_clip and diffusers do.

    "!" in a prompt is the ordinary "!</w>" (256), as open_clip (which sgm, AUTOMATIC1111 and ComfyUI use) reads
    it; diffusers' tokenizer_2, whose pad token is "!", turns every "!" into the pad id 0 instead (on purpose
    different: an exclamation mark is punctuation, not padding)."""
    return Tokenizer(max_length=77, pad_token_id=0, pad_text_is_special=False)


@lru_cache(maxsize=None)
def _transformers_vocab_files() -> tuple[str, str]:
    """The text of vocab.json (token -> id, in id order) and merges.txt (in rank order)."""
    bpe = _load_bpe()
    vocab = json.dumps({token: i for i, token in enumerate(bpe.tokens)}, ensure_ascii=False)
    merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in bpe.ranks) + "\n"  # dicts keep insertion order
    return vocab, merges


def write_transformers_files(folder: Path, *, pad_token: str) -> None:
    """Write the CLIP tokenizer files of an SDXL diffusers folder into `folder` (created if needed).

    vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json, laid out as the
    official repos' `tokenizer/` (pad_token "<|endoftext|>", CLIP ViT-L) and `tokenizer_2/`
    (pad_token "!", OpenCLIP bigG), from this module's own vocabulary and merges, so that
    transformers' `CLIPTokenizer.from_pretrained(folder)` tokenizes as `Tokenizer` does.
    """
    bpe = _load_bpe()
    if pad_token not in bpe.ids:
        raise ValueError(f"pad_token {pad_token!r} is not a token of the CLIP vocabulary")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _transformers_vocab_files()
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")

    def token(content: str, typed: bool) -> dict:
        entry = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"__type": "AddedToken", **entry} if typed else entry

    def specials(typed: bool) -> dict:
        return {
            "bos_token": token("<|startoftext|>", typed),
            "eos_token": token("<|endoftext|>", typed),
            "pad_token": pad_token,
            "unk_token": token("<|endoftext|>", typed),
        }

    (folder / "special_tokens_map.json").write_text(json.dumps(specials(False), indent=2) + "\n", encoding="utf-8")
    config = {
        "add_prefix_space": False,
        **specials(True),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
