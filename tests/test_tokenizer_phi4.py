"""Phi-4-mini's tokenizer (`pocketlm.tokenizer_bytelevel`) against the oracles.

No real Phi-4-mini tokenizer.json is at hand offline, so one of the same kind is built here with
HF `tokenizers`: BPE trained on the Shakespeare in tests/data (3000 merges over the 256 byte
characters), the o200k Split + ByteLevel pre-tokenizer, the ByteLevel decoder, Phi-4-mini's
special tokens as added tokens at Phi-4-mini's offsets after the vocabulary (<|endoftext|> one
past it with a hole before, like 199999 after o200k's 199998 ranks; <|endofprompt|> at +20, the
chat and tool tokens from +21) and config.json's vocab_size padded past them, like 200064.
Oracles: `tokenizers` encoding and decoding that file; the `regex` module and tiktoken's own
o200k pattern string for the pre-tokenizer; llama.cpp (llama-cpp-python) on a vocabulary-only
phi3 GGUF written from `to_gguf_fields`; jinja2 rendering Phi-4-mini's chat template.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np
import pytest
import regex
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from phi4_fixtures import corpus_text, write_phi4_tokenizer

from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.pretokenize import pretokenize
from pocketlm.tokenizer import CONTROL, NORMAL, UNUSED, Tokenizer, tokenizer_from_dir, tokenizer_from_gguf_fields
from pocketlm.tokenizer_bytelevel import O200K_PATTERN, PHI4_MINI_CHAT_TEMPLATE, ByteLevelTokenizer

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
    "word \n  ",
    "x \u3000\n",
    "\u00a0non-breaking\u00a0space\u2028line\u2029para\x85next",
    "Hello 👋 world 🌍! 👨‍👩‍👧‍👦 family, 🇫🇷 flag",
    "😀😀😀",
    "中文分词测试，这是一个句子。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم، هذه جملة عربية. ١٢٣٤٥",
    "1 12 123 1234 12345 1234567890 3.14159 1,000,000",
    "I'm you're he's we've they'll I'd don't",
    "I'M YOU'RE HE'S WE'VE THEY'LL I'D DON'T",
    "i'M yOu'Re hE's",
    "camelCase PascalCase snake_case kebab-case XMLHttpRequest iPhone fooBAR",
    "ALLCAPS WORDS AND MiXeD cAsE",
    "a/b/c https://example.com/path//x?y=1 ../dir/\n",
    "<|user|>Hi<|end|><|assistant|>Hello<|end|>",
    "text<|endoftext|>more<|endofprompt|>",
    "<|system|>Be brief.<|tool|>[{\"name\": \"f\"}]<|/tool|><|end|>",
    "<|tool_call|>{}<|/tool_call|><|tool_response|>ok<|tag|>",
    "<|notatoken|> <| end |> <|end",
    "café naïve résumé Ångström e\u0301",
    "\u0301\u0301a\u0301 \u0915\u094d\u0937 ﬁ ǅungla",
    "𝐀𝐁𝐂 𝐚𝐛𝐜 𝟏𝟐𝟑 𐐀𐐨",
    "\x00\x01\x7f control",
    "    def f(x):\n        return x  # four spaces\n",
]


def _random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [
        *"abcXYZ019 \t\n\r'/.,!?-_", "é", "É", "ß", "中", "ه", "١", "😀", "\u0301", "\u3000", "\xa0", "𝐀",
        "<|end|>", "<|user|>", "'s", "'LL", "\r\n",
    ]

    def any_char() -> str:
        # any code point but surrogates and those unassigned in Python's Unicode database: the
        # oracles may know newer Unicode (pocketlm.pretokenize's docstring)
        while True:
            c = chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
            if unicodedata.category(c) != "Cn":
                return c

    out = []
    for _ in range(count):
        n = rng.randrange(0, 40)
        if rng.random() < 0.2:
            out.append("".join(any_char() for _ in range(n)))
        else:
            out.append("".join(rng.choice(alphabet) for _ in range(n)))
    return out


RANDOM = _random_strings(500, seed=18)


@pytest.fixture(scope="module")
def corpus() -> str:
    return corpus_text()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, corpus: str) -> Path:
    """A Phi-4-mini-style checkpoint tokenizer folder built with HF `tokenizers`."""
    return write_phi4_tokenizer(tmp_path_factory.mktemp("phi4_tok"), corpus)


@pytest.fixture(scope="module")
def hf(folder: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(folder: Path) -> ByteLevelTokenizer:
    t = tokenizer_from_dir(folder)
    assert isinstance(t, ByteLevelTokenizer)
    return t


@pytest.fixture(scope="module")
def gguf_path(tok: ByteLevelTokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phi4_gguf") / "vocab.gguf"
    with GGUFWriter(path, {"general.architecture": "phi3", "general.name": "tiny phi4", **tok.to_gguf_fields()}, []):
        pass
    return path


@pytest.fixture(scope="module")
def llama(gguf_path: Path):
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


# ------------------------------------------------------------------------------ pre-tokenizer


def test_pattern_is_tiktokens_o200k(monkeypatch):
    """The pattern string is tiktoken's own o200k_base pat_str (its rank file is not shipped
    offline, so the loader is stubbed: only the pattern is read)."""
    from tiktoken_ext import openai_public

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    assert openai_public.o200k_base()["pat_str"] == O200K_PATTERN


def test_o200k_pieces_match_the_regex_module(corpus: str):
    oracle = regex.compile(O200K_PATTERN)
    for text in [*EDGE_CASES, *RANDOM, corpus[:200_000]]:
        assert pretokenize(text, "o200k") == oracle.findall(text), repr(text[:80])


def test_o200k_splits_case_runs_and_keeps_contractions():
    assert pretokenize("camelCase fooBAR HTTPServer I'M don't", "o200k") == [
        "camel", "Case", " foo", "BAR", " HTTPServer", " I'M", " don't"]
    # cl100k (the other engineer's pattern) is unchanged: whole words, contractions apart
    assert pretokenize("camelCase I'M") == ["camelCase", " I", "'M"]


# ---------------------------------------------------------------------------- encode / decode


def test_corpus_ids_equal_hf(tok: ByteLevelTokenizer, hf: tokenizers.Tokenizer, corpus: str):
    ids = tok.encode(corpus)
    assert ids == hf.encode(corpus).ids
    assert len(ids) < len(corpus.encode()) / 3  # the merges are used, not bytes
    assert tok.decode(ids) == corpus


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_equal_hf(tok: ByteLevelTokenizer, hf: tokenizers.Tokenizer, text: str):
    ids = tok.encode(text)
    assert ids == hf.encode(text).ids
    assert tok.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_random_strings_equal_hf(tok: ByteLevelTokenizer, hf: tokenizers.Tokenizer):
    for text in RANDOM:
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids, repr(text)
        assert tok.decode(ids, skip_special=False) == text


def test_special_tokens_and_ids(tok: ByteLevelTokenizer, hf: tokenizers.Tokenizer):
    n = tok.vocab_size
    assert n % 64 == 0 and n > max(hf.get_vocab().values()) + 1  # padded like Phi-4-mini's 200064
    eot, end = hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|end|>")
    assert tok.bos_id == tok.eos_id == tok.pad_id == eot
    assert tok.stop_ids == sorted([eot, end])
    as_text = tok.encode("a<|end|>b", parse_special=False)  # llama.cpp's special=False: plain text
    assert end not in as_text and tok.decode(as_text) == "a<|end|>b"
    assert tok.decode(tok.encode("a<|end|>b")) == "ab"  # special tokens are skipped by default
    assert tok.encode("x", add_bos=True) == [eot, *tok.encode("x")]
    assert tok.decode([tok.vocab_size - 1]) == ""  # a padding id decodes to nothing
    with pytest.raises(PocketLMError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_stream_decoder_equals_decode(tok: ByteLevelTokenizer):
    for text in [*EDGE_CASES, "é😀中" * 3]:
        ids = tok.encode(text)
        for skip in (True, False):
            d = tok.stream_decoder(skip_special=skip)
            assert "".join(d.push(i) for i in ids) + d.flush() == tok.decode(ids, skip_special=skip)
    # a token holding half of a UTF-8 sequence never breaks the stream
    half = [tok.vocab[c] for c in ("ð", "Ł")]  # the first two bytes of an emoji
    d = tok.stream_decoder()
    assert d.push(half[0]) == "" and d.push(half[1]) == "" and d.flush() == "\ufffd"
    assert tok.decode(half) == "\ufffd"


# ------------------------------------------------------------------------------------- llama.cpp


def test_gguf_layout(tok: ByteLevelTokenizer, gguf_path: Path, hf: tokenizers.Tokenizer, folder: Path):
    with GGUFReader(gguf_path) as reader:
        fields = reader.tokenizer_fields()
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-4o"
    tokens, types = list(fields["tokenizer.ggml.tokens"]), np.asarray(fields["tokenizer.ggml.token_type"]).tolist()
    assert len(tokens) == len(types) == json.loads((folder / "config.json").read_text())["vocab_size"]
    vocab = hf.get_vocab()
    added = {t.content for t in hf.get_added_tokens_decoder().values()}
    for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if i in vocab.values():
            assert vocab[text] == i and kind == (CONTROL if text in added else NORMAL)
        else:
            assert (text, kind) == (f"[PAD{i}]", UNUSED)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert list(fields["tokenizer.ggml.merges"]) == [" ".join(m) for m in data["model"]["merges"]]
    assert fields["tokenizer.chat_template"] == PHI4_MINI_CHAT_TEMPLATE

    back = tokenizer_from_gguf_fields(fields, gguf_path)
    assert isinstance(back, ByteLevelTokenizer)
    assert isinstance(Tokenizer.from_gguf_fields(fields, gguf_path), ByteLevelTokenizer)
    assert back.to_gguf_fields().keys() == tok.to_gguf_fields().keys()
    for text in EDGE_CASES[:30]:
        assert back.encode(text) == tok.encode(text)
    assert (back.bos_id, back.eos_id, back.stop_ids, back.vocab_size) == (
        tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size)


def test_llama_cpp_tokenizes_the_same(tok: ByteLevelTokenizer, llama, corpus: str):
    for text in [*EDGE_CASES, *RANDOM[:200], corpus[:50_000]]:
        raw = text.encode()
        assert llama.tokenize(raw, add_bos=False, special=True) == tok.encode(text), repr(text[:80])
        assert llama.tokenize(raw, add_bos=False, special=False) == tok.encode(text, parse_special=False)
    ids = tok.encode(EDGE_CASES[17] + corpus[:2000])
    assert llama.detokenize(ids).decode("utf-8", "replace") == tok.decode(ids)


def test_written_hf_files_read_back(tok: ByteLevelTokenizer, tmp_path: Path, corpus: str):
    """write_hf_files (the ONNX export's tokenizer) gives files HF `tokenizers` and pocketlm read
    as the same tokenizer."""
    tok.write_hf_files(tmp_path)
    hf_back = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours_back = tokenizer_from_dir(tmp_path)
    for text in [*EDGE_CASES, corpus[:20_000]]:
        assert hf_back.encode(text).ids == ours_back.encode(text) == tok.encode(text)
    assert ours_back.chat_template == tok.chat_template and ours_back.stop_ids == tok.stop_ids


# ------------------------------------------------------------------------------------ chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}],
    [{"role": "system", "content": "You have tools.", "tools": '[{"name": "get_weather"}]'},
     {"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "No tools here.", "tools": None}, {"role": "tool", "content": "{}"}],
    [{"role": "user", "content": "  spaces  and <|end|> inside  "}],
    [],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_jinja(tok: ByteLevelTokenizer, messages, add_generation_prompt: bool):
    # transformers renders chat templates in this sandbox with these options
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    want = env.from_string(tok.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token="<|endoftext|>")
    assert tok.apply_chat_template(messages, add_generation_prompt) == want


def test_chat_prompt_tokens(tok: ByteLevelTokenizer, hf: tokenizers.Tokenizer):
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|user|>Hi<|end|><|assistant|>"
    ids = tok.encode(prompt)
    assert ids == hf.encode(prompt).ids and ids[0] == hf.token_to_id("<|user|>")
    with pytest.raises(PocketLMError, match="tools"):
        tok.apply_chat_template([{"role": "system", "content": "x", "tools": [{"name": "f"}]}])


# ---------------------------------------------------------------------------------------- errors


def _variant(folder: Path, tmp_path: Path, change) -> Path:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    change(data)
    out = tmp_path / "variant"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\s+"), "o200k"),
        (lambda d: d["model"]["merges"].append(["Ġ", "zzzq"]), "not in the vocab"),
        (lambda d: d["model"]["vocab"].pop("Ġ"), "every byte"),
        (lambda d: d["added_tokens"][0].update(rstrip=True), "rstrip"),
        (lambda d: d["model"].update(dropout=0.1), "dropout"),
        (lambda d: d["model"]["vocab"].update({"x": "seven"}), "not an integer"),
    ],
)
def test_bad_tokenizer_json_is_one_clear_error(folder: Path, tmp_path: Path, change, message: str):
    bad = _variant(folder, tmp_path, change)
    with pytest.raises(PocketLMError, match=message) as e:
        ByteLevelTokenizer.from_hf_dir(bad)
    assert "tokenizer.json" in str(e.value)


def test_bad_gguf_fields_are_one_clear_error(tok: ByteLevelTokenizer):
    fields = tok.to_gguf_fields()
    with pytest.raises(PocketLMError, match="gpt-4o"):
        ByteLevelTokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "llama-bpe"}, "x.gguf")
    with pytest.raises(PocketLMError, match="merge 0"):
        ByteLevelTokenizer.from_gguf_fields({**fields, "tokenizer.ggml.merges": ["ab"]}, "x.gguf")
    with pytest.raises(PocketLMError, match="names no token"):
        ByteLevelTokenizer.from_gguf_fields({**fields, "tokenizer.ggml.eos_token_id": tok.vocab_size - 1}, "x.gguf")
    with pytest.raises(PocketLMError, match="missing"):
        ByteLevelTokenizer.from_gguf_fields({k: v for k, v in fields.items() if k != "tokenizer.ggml.merges"})


def test_lone_surrogates_and_non_text(tok: ByteLevelTokenizer):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    with pytest.raises(PocketLMError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
