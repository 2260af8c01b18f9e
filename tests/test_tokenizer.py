"""pocketlm.tokenizer against independent oracles.

1. llama.cpp (llama-cpp-python, vocab-only load of the real Phi-3 vocabulary GGUF): token ids over
   the whole Shakespeare corpus, edge cases and random mixtures; the bytes of every token; decode.
2. HF `tokenizers` on the tokenizer.json that `write_hf_files` exports from the GGUF vocabulary.
3. HF `tokenizers` on a SentencePiece BPE vocabulary converted by transformers (and on the
   built-in model's vocabulary once it exists): the tokenizer.json path with merge ranks.
4. jinja2 rendering Microsoft's Phi-3.5 chat template.
"""

from __future__ import annotations

import ctypes
import json
import random
import re
import shutil
from pathlib import Path

import gguf
import jinja2
import llama_cpp
import numpy as np
import pytest
import tokenizers

from pocketlm.chat import apply_chat_template
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import GGUF_FIELD_TYPES, Tokenizer

REPO = Path(__file__).resolve().parents[1]
BUILTIN_DIR = REPO / "pocketlm" / "builtin"

EDGE_CASES = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    " \n \t ",
    "Hello world",
    " Hello",
    "Hello  world   with    runs of spaces     ",
    "tabs\tand\nnewlines\r\nand\u000bvertical\u000cfeeds",
    "emoji 😀👍🏽🇫🇷 and zwj 👩‍👩‍👧",
    "CJK 漢字かなカナ 한국어",
    "Cyrillic: Съешь же ещё этих мягких французских булок",
    "digits 0123456789 3.14159 1,000,000",
    "accents é e\u0301 ﬁ ß İ",
    "rare \U0001d518\U0010ffff\u200b\x00\x7f",
    "▁ literal ▁▁ pieces",
    "<|user|>\nHi<|end|>\n",
    "<|user|>\nHi<|end|>\n<|assistant|>\nHello there!<|end|>\n",
    "<|system|>\nYou are helpful.<|end|>\n<|user|>\nQ?<|end|>\n<|assistant|>\n",
    "text before <|end|> and after",
    "<|endoftext|> keeps its space",
    "</s> swallows it, <s> and <unk> do not",
    "<|end|>  \n\t  spaces after a special token",
    "<|end|>\u3000ideographic space is not ASCII whitespace",
    "[PAD32011] <|placeholder3|> unusual specials",
    "<|user|><|end|><|assistant|>",
    "<|us er|> <|end| > broken specials",
]
# HF rstrip removes Unicode whitespace, llama.cpp only ASCII (C isspace): the exported
# tokenizer.json can't reproduce llama.cpp there, so the HF comparison leaves this case out.
LLAMA_ONLY = {"<|end|>\u3000ideographic space is not ASCII whitespace"}


# ------------------------------------------------------------------------------------ fixtures


def gguf_fields(path: Path) -> dict:
    """GGUF metadata as the plain mapping Tokenizer.from_gguf_fields takes."""
    reader = gguf.GGUFReader(path)
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith(("tokenizer.", "general."))
    }


@pytest.fixture(scope="module")
def vocab_path(data_root: Path) -> Path:
    return data_root / "data" / "phi3" / "ggml-vocab-phi-3.gguf"


@pytest.fixture(scope="module")
def phi3_fields(vocab_path: Path) -> dict:
    return gguf_fields(vocab_path)


@pytest.fixture(scope="module")
def tok(phi3_fields: dict, vocab_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(phi3_fields, source=vocab_path)


@pytest.fixture(scope="module")
def llama(vocab_path: Path):
    return llama_cpp.Llama(model_path=str(vocab_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def corpus(data_root: Path) -> dict[str, str]:
    files = sorted((data_root / "data" / "shakespeare").glob("*.txt"))
    assert files, "the Shakespeare corpus is empty"
    return {f.name: f.read_text(encoding="utf-8") for f in files}


@pytest.fixture(scope="module")
def exported(tok: Tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phi3_hf")
    tok.write_hf_files(out)
    return out


@pytest.fixture(scope="module")
def hf_exported(exported: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))


def llama_ids(llama, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
    return llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)


def llama_piece(llama, token_id: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, len(buf), 0, special)
    assert n >= 0
    return buf.raw[:n]


def random_texts(seed: int, count: int) -> list[str]:
    """Mixtures of words, whitespace runs, rare characters and (broken) special tokens."""
    atoms = [
        " ", "  ", "\t", "\n", "\r\n", "a", "Hello", "world", "ing", "The", "😀", "👍🏽", "漢字",
        "Привет", "123", "4567", "!", "'s", "<|user|>", "<|end|>", "<|assistant|>", "<|system|>",
        "<|endoftext|>", "</s>", "<s>", "<unk>", "[PAD32011]", "<|", "|>", "<0x41>", "\x00",
        "\u200b", "é", "e\u0301", "ﬁ", "𝔘", "▁", "▁▁", "x", "\u3000", "\xa0",
    ]  # fmt: skip
    rng = random.Random(seed)
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 12))) for _ in range(count)]


# ------------------------------------------------------------------------- llama.cpp oracle


def test_corpus_ids_match_llama_cpp(tok: Tokenizer, llama, corpus: dict[str, str]):
    for name, text in corpus.items():
        ours = tok.encode(text)
        assert ours == llama_ids(llama, text), name
        assert tok.decode(ours) == text, name


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_llama_cpp(tok: Tokenizer, llama, text: str):
    for add_bos in (True, False):
        for special in (True, False):
            ours = tok.encode(text, add_bos=add_bos, parse_special=special)
            assert ours == llama_ids(llama, text, add_bos, special), (add_bos, special)


def test_random_mixtures_match_llama_cpp(tok: Tokenizer, llama):
    for text in random_texts(seed=0, count=600):
        for special in (True, False):
            expected = llama_ids(llama, text, True, special)
            assert tok.encode(text, parse_special=special) == expected, repr(text)


def test_phi3_chat_tokens_swallow_following_whitespace(tok: Tokenizer, llama):
    text = "<|user|>\nHi<|end|>\n"
    assert tok.encode(text, add_bos=False) == [32010, 6324, 32007]
    assert llama_ids(llama, text, add_bos=False) == [32010, 6324, 32007]
    # Without parse_special the markers are plain text, as in llama.cpp.
    assert 32010 not in tok.encode(text, parse_special=False)


def test_every_token_decodes_like_llama_cpp(tok: Tokenizer, llama):
    for token_id in range(tok.vocab_size):
        assert tok.token_bytes(token_id) == llama_piece(llama, token_id, special=False), token_id
        assert tok.token_bytes(token_id, skip_special=False) == llama_piece(llama, token_id, special=True)


# Leaves out special tokens (whitespace after them is swallowed) and a literal "▁" (decodes as " ").
@pytest.mark.parametrize("text", [t for t in EDGE_CASES if "<" not in t and "▁" not in t])
def test_decode_round_trips_and_matches_llama_detokenize(tok: Tokenizer, llama, text: str):
    ids = tok.encode(text)  # starts with bos, so llama-cpp-python drops the prefix space too
    assert tok.decode(ids) == text
    assert tok.decode(ids) == llama.detokenize(ids).decode("utf-8", errors="replace")


def test_stream_decoder_holds_back_partial_utf8(tok: Tokenizer):
    text = "Émoji 😀 漢字 \U0010ffff then ascii, 👩‍👩‍👧"
    ids = tok.encode(text)
    assert any(tok.token_types[i] == 6 for i in ids), "the text should need byte-fallback tokens"
    stream = tok.stream_decoder()
    parts = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(parts) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts)
    assert "" in parts  # some bytes were held back until their character was complete


def test_stream_decoder_continuation_keeps_the_space_after_a_prompt(tok: Tokenizer):
    """Generated text follows a prompt: decode(prompt) + streamed continuation == decode(all ids)."""
    ids = tok.encode("Now, my lords, and then we part")
    prompt = tok.encode("Now, my lords,")
    assert ids[: len(prompt)] == prompt
    stream = tok.stream_decoder(continuation=True)
    continued = "".join(stream.push(i) for i in ids[len(prompt) :]) + stream.flush()
    assert tok.decode(prompt) + continued == tok.decode(ids)
    assert continued == " and then we part"


def test_stop_ids_and_specials(tok: Tokenizer):
    assert tok.stop_ids == [32000, 32007]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 32000, 0, 32000)
    assert tok.add_bos and tok.vocab_size == 32064
    assert tok.encode("") == [1] and tok.encode("", add_bos=False) == []


# --------------------------------------------------------------- HF tokenizers on the export


def test_exported_tokenizer_json_matches_on_corpus(tok: Tokenizer, hf_exported, corpus: dict[str, str]):
    names, texts = list(corpus), list(corpus.values())
    for name, text, encoding in zip(names, texts, hf_exported.encode_batch(texts), strict=True):
        assert encoding.ids == tok.encode(text), name
    for text, encoding in zip(texts[:3], hf_exported.encode_batch(texts[:3]), strict=True):
        assert hf_exported.decode(encoding.ids, skip_special_tokens=True) == tok.decode(encoding.ids) == text


def test_exported_tokenizer_json_matches_on_edge_cases(tok: Tokenizer, hf_exported):
    texts = [t for t in EDGE_CASES if t not in LLAMA_ONLY]
    texts += [t for t in random_texts(seed=1, count=600) if "\u3000" not in t and "\xa0" not in t]
    for text in texts:
        ids = hf_exported.encode(text).ids
        assert ids == tok.encode(text), repr(text)
        assert hf_exported.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(text)


def test_exported_files_reload(tok: Tokenizer, exported: Path, corpus: dict[str, str]):
    again = Tokenizer.from_hf_dir(exported)  # now BPE by merge ranks, not by scores
    assert (again.bos_id, again.eos_id, again.unk_id, again.pad_id) == (1, 32000, 0, 32000)
    assert again.chat_template == tok.chat_template and again.add_bos
    assert again.pieces == tok.pieces and again.stop_ids == tok.stop_ids
    text = next(iter(corpus.values()))
    assert again.encode(text) == tok.encode(text)
    for text in EDGE_CASES:
        if text not in LLAMA_ONLY:
            assert again.encode(text) == tok.encode(text), repr(text)
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    # transformers 5 rebuilds LlamaTokenizer with a Metaspace pre-tokenizer, which adds no "▁"
    # to a fragment that starts with a space (or "▁"); elsewhere it must agree.
    for text in [t for t in EDGE_CASES if t not in LLAMA_ONLY and not re.search(r"^[ ▁]|> ", t)]:
        assert hf_tokenizer(text)["input_ids"] == tok.encode(text), repr(text)
    messages = [{"role": "user", "content": "Hi"}]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>" + tok.apply_chat_template(messages)  # the GGUF template starts with bos
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["add_bos_token"] is True
    assert json.loads((exported / "special_tokens_map.json").read_text())["bos_token"] == "<s>"


ORDINARY_TEXTS = [
    "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nName three seas.<|end|>\n<|assistant|>\n",
    "Hello world, how are you today? Fine, thank you.",
    "To be, or not to be, that is the question:\nWhether tis nobler in the mind to suffer",
    "CJK 漢字かなカナ 한국어 and Cyrillic Съешь же ещё этих мягких булок",
    "emoji 😀👍🏽 digits 0123456789 3.14159",
    "  leading spaces and\ttabs\n\nand blank lines",
]


def test_onnxruntime_genai_loads_the_export(tok: Tokenizer, exported: Path, tmp_path: Path):
    """onnxruntime-genai (onnxruntime-extensions inside) reads the exported files. Its own Llama
    pre-tokenizing differs from HF tokenizers on apostrophe contractions ("bear'st"), space runs
    before digits, "\\r", NUL and a literal "▁", so only ordinary text is compared here."""
    import onnxruntime_genai as og

    folder = tmp_path / "genai"
    shutil.copytree(exported, folder)
    # Tokenizer(folder) reads genai_config.json but loads no model.
    config = {
        "model": {
            "type": "phi3",
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.stop_ids,
            "pad_token_id": tok.pad_id,
            "context_length": 4096,
            "vocab_size": tok.vocab_size,
            "decoder": {
                "filename": "model.onnx",
                "head_size": 96,
                "hidden_size": 3072,
                "num_attention_heads": 32,
                "num_hidden_layers": 1,
                "num_key_value_heads": 32,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                "outputs": {"logits": "logits"},
            },
        },
        "search": {"max_length": 4096},
    }
    (folder / "genai_config.json").write_text(json.dumps(config))
    genai = og.Tokenizer(str(folder))
    for text in ORDINARY_TEXTS:
        ids = [int(i) for i in genai.encode(text)]  # onnxruntime-genai adds no bos
        assert ids == tok.encode(text, add_bos=False), repr(text)
        if "<|" not in text:  # it drops the "▁" of a word after a skipped special token; HF keeps it
            with_bos = [tok.bos_id, *ids]  # it strips the prefix space only after bos
            assert genai.decode(np.asarray(with_bos, dtype=np.int32)) == tok.decode(with_bos) == text


# ------------------------------------------------------------------------------- GGUF fields


def write_vocab_gguf(path: Path, template: Path, fields: dict, name: str = "Phi3") -> None:
    """A vocab-only GGUF: the template's phi3.* hyper-parameters plus `fields`. llama.cpp keys
    Phi-3's whitespace stripping on the name (and then needs <|endoftext|> in the vocabulary)."""
    vtypes = {
        "string": gguf.GGUFValueType.STRING,
        "bool": gguf.GGUFValueType.BOOL,
        "uint32": gguf.GGUFValueType.UINT32,
    }
    subtypes = {
        "array[string]": gguf.GGUFValueType.STRING,
        "array[float32]": gguf.GGUFValueType.FLOAT32,
        "array[int32]": gguf.GGUFValueType.INT32,
    }
    writer = gguf.GGUFWriter(path, arch="phi3")
    reader = gguf.GGUFReader(template)
    for key, field in reader.fields.items():
        if key.startswith("phi3.") or key == "general.file_type":
            writer.add_key_value(key, field.contents(), field.types[0])
    writer.add_name(name)
    for key, value in fields.items():
        kind = GGUF_FIELD_TYPES[key]
        if kind in subtypes:
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=subtypes[kind])
        else:
            writer.add_key_value(key, value, vtypes[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_fields_round_trip_through_llama_cpp(tok: Tokenizer, vocab_path: Path, tmp_path: Path, corpus):
    fields = tok.to_gguf_fields()
    assert fields["tokenizer.ggml.scores"].dtype == np.float32
    assert fields["tokenizer.ggml.token_type"].dtype == np.int32
    assert set(fields) <= set(GGUF_FIELD_TYPES)
    path = tmp_path / "vocab.gguf"
    write_vocab_gguf(path, vocab_path, fields)
    again = Tokenizer.from_gguf_fields(gguf_fields(path))
    assert again.pieces == tok.pieces and again.scores == tok.scores and again.token_types == tok.token_types
    rewritten = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = next(iter(corpus.values()))[:20000] + EDGE_CASES[20]
    assert llama_ids(rewritten, text) == tok.encode(text) == again.encode(text)


def test_phi3_whitespace_rule_follows_general_name(tok, phi3_fields, vocab_path: Path, tmp_path: Path):
    """llama.cpp strips whitespace after Phi-3's chat tokens only for a model named phi3/phi-3."""
    assert tok.wants_phi3_name
    text = "<|user|>\nHi<|end|>\n<|assistant|>\n"
    path = tmp_path / "other.gguf"
    write_vocab_gguf(path, vocab_path, tok.to_gguf_fields(), name="tiny-model")
    other = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    unnamed = Tokenizer.from_gguf_fields({**phi3_fields, "general.name": "tiny-model"})
    assert not unnamed.wants_phi3_name
    assert unnamed.encode(text) == llama_ids(other, text) != tok.encode(text)


def test_bad_input_raises_pocketlm_error(phi3_fields: dict, tok: Tokenizer, tmp_path: Path):
    fields = phi3_fields
    with pytest.raises(PocketLMError, match="gpt2"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.model": "gpt2"})
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.model"):
        with pytest.raises(PocketLMError, match=re.escape(key)):
            Tokenizer.from_gguf_fields({k: v for k, v in fields.items() if k != key})
    with pytest.raises(PocketLMError, match="out of range"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(PocketLMError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(PocketLMError, match="Unigram"):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(PocketLMError, match=r"no tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    with pytest.raises(PocketLMError, match="not valid Unicode"):
        tok.encode("lone surrogate \ud800")


# ----------------------------------------------------- SentencePiece BPE via transformers


@pytest.fixture(scope="module")
def sentencepiece_dir(corpus: dict[str, str], tmp_path_factory) -> Path:
    """A small SentencePiece BPE vocabulary, converted to tokenizer.json by transformers."""
    import sentencepiece
    import transformers

    work = tmp_path_factory.mktemp("spm")
    (work / "train.txt").write_text("".join(corpus.values())[:300_000], encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(work / "train.txt"),
        model_prefix=str(work / "m"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=["<|user|>", "<|end|>"],
        minloglevel=2,
        num_threads=1,
    )
    source = work / "src"
    source.mkdir()
    shutil.copy(work / "m.model", source / "tokenizer.model")
    out = work / "hf"
    transformers.LlamaTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def check_against_tokenizers(folder: Path, texts: list[str]) -> Tokenizer:
    ours = Tokenizer.from_hf_dir(folder)
    oracle = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in texts:
        ids = oracle.encode(text).ids
        assert ours.encode(text) == ids, repr(text[:80])
        assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=True), repr(text[:80])
    return ours


def test_sentencepiece_bpe_tokenizer_json_matches_tokenizers(sentencepiece_dir: Path, corpus):
    texts = list(corpus.values())[:8] + EDGE_CASES + random_texts(seed=2, count=400)
    ours = check_against_tokenizers(sentencepiece_dir, texts)
    assert ours.merges  # merged by rank, HF semantics
    assert not ours.wants_phi3_name  # its <|user|> and <|end|> keep the whitespace after them


def test_sentencepiece_bpe_to_gguf_matches_llama_cpp(sentencepiece_dir: Path, vocab_path, tmp_path, corpus):
    ours = Tokenizer.from_hf_dir(sentencepiece_dir)
    path = tmp_path / "spm.gguf"
    write_vocab_gguf(path, vocab_path, ours.to_gguf_fields(), name="sentencepiece-test")
    rewritten = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    again = Tokenizer.from_gguf_fields(gguf_fields(path))
    for text in list(corpus.values())[:4]:
        # Scores derived from merge ranks: llama.cpp merging by score repeats merging by rank.
        # (The corpus has no leading space or special token, where Metaspace and llama.cpp differ.)
        assert llama_ids(rewritten, text, add_bos=False) == ours.encode(text) == again.encode(text)
    for text in EDGE_CASES:
        assert again.encode(text) == ours.encode(text), repr(text)


def test_builtin_tokenizer_matches_tokenizers(corpus):
    check_against_tokenizers(BUILTIN_DIR, list(corpus.values())[:4] + EDGE_CASES + random_texts(3, 300))


# -------------------------------------------------------------------------------------- chat

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a sea."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system is dropped"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and\nmultiline\n\n  text?"},
    ],
    [{"role": "tool", "content": "ignored"}, {"role": "user", "content": "<|end|> inside text 漢字 😀"}],
    [],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_jinja(data_root: Path, tok: Tokenizer, messages):
    source = (data_root / "data" / "phi3" / "microsoft-Phi-3.5-mini-instruct.jinja").read_text()
    template = jinja2.Environment().from_string(source)
    for add_generation_prompt in (True, False):
        expected = template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token="<|endoftext|>"
        )
        assert apply_chat_template(messages, add_generation_prompt) == expected
        assert tok.apply_chat_template(messages, add_generation_prompt) == expected
