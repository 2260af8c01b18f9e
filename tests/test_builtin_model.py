"""The shipped built-in model (`pocketlm/builtin/`) and the corpus split it was trained on.

Oracles: transformers (loads the checkpoint, recomputes held-out perplexity), sentencepiece (the
tokenizer.model the tokenizer.json was converted from), gguf-py reading the real Phi-3 vocabulary
(names and order of the chat tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import pocketlm
from pocketlm import corpus
from pocketlm.errors import PocketLMError

BUILTIN = Path(pocketlm.__file__).resolve().parent / "builtin"
MAX_BYTES = 12_000_000  # the committed checkpoint's budget, all files together
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "training.json")
SEQ_LEN = 256
SLICE_TOKENS = 4096


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((BUILTIN / "training.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    import transformers

    m = transformers.Phi3ForCausalLM.from_pretrained(BUILTIN, dtype="float32")
    return m.eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(BUILTIN)


# --------------------------------------------------------------------------------------- corpus

def test_corpus_splits_are_disjoint_nonempty_and_cover_the_corpus(data_root):
    files = {s: corpus.corpus_files(s, data_root) for s in corpus.SPLITS}
    stems = {s: {p.stem for p in fs} for s, fs in files.items()}
    assert all(stems.values())
    assert not stems["train"] & stems["heldout"]
    assert not stems["train"] & stems["calib"]
    assert not stems["calib"] & stems["heldout"]  # never calibrate on what is evaluated
    everything = {p.stem for p in (data_root / "data" / "shakespeare").glob("*.txt")}
    assert stems["train"] | stems["heldout"] | stems["calib"] == everything
    assert files["heldout"] == sorted(files["heldout"])  # deterministic order


def test_corpus_split_texts_share_no_passage(data_root):
    train = corpus.read_split("train", data_root)
    for split in ("heldout", "calib"):
        for path in corpus.corpus_files(split, data_root):
            text = corpus.read_work(path)
            # A verse passage from the middle of the work (titles and stage directions repeat).
            mid = len(text) // 2
            assert len(text) > 10_000
            assert text[mid:mid + 300] not in train, path.name


def test_corpus_strips_gutenberg_boilerplate():
    raw = ("The Project Gutenberg EBook of X\r\nlicence text\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nACT I.\r\nWhen shall we three meet\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n")
    assert corpus.strip_gutenberg(raw) == "ACT I.\nWhen shall we three meet\n"
    assert corpus.strip_gutenberg("plain text\n\n") == "plain text\n"


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(PocketLMError, match="corpus folder is missing"):
        corpus.corpus_files("train", tmp_path)
    (tmp_path / "data" / "shakespeare").mkdir(parents=True)
    (tmp_path / "data" / "shakespeare" / "macbeth_gut.txt").write_text("x\n")
    with pytest.raises(PocketLMError, match="lacks the work"):
        corpus.corpus_files("train", tmp_path)
    with pytest.raises(PocketLMError, match="unknown corpus split"):
        corpus.corpus_files("test", tmp_path)


# ----------------------------------------------------------------------------------- checkpoint

def test_builtin_files_exist_and_fit_the_size_budget():
    for name in REQUIRED:
        assert (BUILTIN / name).is_file(), name
    total = sum(p.stat().st_size for p in BUILTIN.iterdir() if p.is_file())
    assert total <= MAX_BYTES, total
    assert not any(p.name.endswith(".tmp") for p in BUILTIN.iterdir())


def test_builtin_is_phi3_with_block_friendly_dims(model, hf_tokenizer, record):
    import torch

    cfg = model.config
    assert cfg.model_type == "phi3"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert cfg.vocab_size == len(hf_tokenizer)
    assert cfg.original_max_position_embeddings == cfg.max_position_embeddings
    raw = json.loads((BUILTIN / "config.json").read_text(encoding="utf-8"))
    # Both spellings, transformers 5's and the 4.x one of Microsoft's published configs.
    assert raw["rope_parameters"]["rope_theta"] == raw["rope_theta"]
    assert raw["torch_dtype"] == raw["dtype"] == "float16"
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * cfg.num_hidden_layers + 1  # qkv, o, gate_up, down per layer; lm_head
    for lin in linears:
        assert lin.in_features % 256 == 0, lin  # Q4_K / Q6_K super-blocks of 256
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    from safetensors import safe_open

    with safe_open(BUILTIN / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118


def test_builtin_tokenizer_is_phi3_style(hf_tokenizer, data_root):
    import gguf
    import sentencepiece as spm

    # Chat tokens: the same names, in the same order, as Phi-3's ids 32000..32010.
    reader = gguf.GGUFReader(data_root / "data" / "phi3" / "ggml-vocab-phi-3.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    phi3_added = [tokens.contents(i) for i in range(32000, 32011)]
    n = len(hf_tokenizer)
    assert hf_tokenizer.convert_ids_to_tokens(list(range(n - 11, n))) == phi3_added
    assert hf_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert hf_tokenizer.eos_token == "<|endoftext|>"

    tj = json.loads((BUILTIN / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] and tj["model"]["merges"]
    rstrip = {t["content"]: t["rstrip"] for t in tj["added_tokens"]}
    # As in Phi-3's tokenizer.json and llama.cpp's phi3 rule.
    assert not rstrip["<|endoftext|>"] and not rstrip["<s>"]
    assert rstrip["<|user|>"] and rstrip["<|end|>"] and rstrip["<|assistant|>"] and rstrip["</s>"]

    template = (data_root / "data" / "phi3" / "microsoft-Phi-3.5-mini-instruct.jinja").read_text()
    assert hf_tokenizer.chat_template == template
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Hail"}], tokenize=False,
                                            add_generation_prompt=True)
    assert chat == "<|user|>\nHail<|end|>\n<|assistant|>\n"

    # tokenizer.json tokenizes like the SentencePiece model it was converted from.
    sp = spm.SentencePieceProcessor(model_file=str(BUILTIN / "tokenizer.model"))
    text = corpus.read_work(corpus.corpus_files("heldout", data_root)[0])[:20000] + " 1623 café ü"
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text)
    assert hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == text


# ----------------------------------------------------------------------------------- perplexity

def heldout_slice_ids(tok, data_root) -> np.ndarray:
    """The first SLICE_TOKENS of the heldout stream (each work opens with <s>), as training did."""
    ids: list[int] = []
    for path in corpus.corpus_files("heldout", data_root):
        ids += tok(corpus.read_work(path)).input_ids  # <s> + pieces
        if len(ids) >= SLICE_TOKENS:
            break
    return np.asarray(ids[:SLICE_TOKENS])


def test_heldout_perplexity_is_far_below_unigram(model, hf_tokenizer, record, data_root):
    import torch

    windows = heldout_slice_ids(hf_tokenizer, data_root).reshape(-1, SEQ_LEN)  # [16, 256]
    x = torch.from_numpy(windows).long()
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ppl = math.exp(float(nll))

    # Unigram baseline: train-split token counts with add-one smoothing, on the same targets. The
    # train split (4.3 MB of text) is not in the repository; tests/data carries its token counts
    # under this tokenizer (tests/data/README.md says how they were made).
    counts = np.load(data_root / "data" / "builtin_train_unigram_counts.npy").astype(np.float64) + 1.0
    assert counts.shape == (len(hf_tokenizer),)
    unigram = math.exp(float(-np.log(counts / counts.sum())[windows[:, 1:]].mean()))

    expected = record["heldout_slice"]
    assert ppl == pytest.approx(expected["perplexity"], rel=0.01)
    assert unigram == pytest.approx(expected["unigram_perplexity"], rel=1e-3)
    assert ppl < unigram / 4, (ppl, unigram)
    assert record["heldout"]["perplexity"] < record["heldout"]["unigram_perplexity"] / 4


def write_vocab_gguf(path: Path, sp, added: list[tuple[int, str]], eos_id: int) -> None:
    """A vocabulary-only phi3 GGUF written with gguf-py (as in the shared Phi-3 vocab file)."""
    import gguf

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(kind)
    for tid, content in added:
        assert tid == len(tokens)
        tokens.append(content.encode())
        scores.append(0.0)
        types.append(gguf.TokenType.CONTROL)
    w = gguf.GGUFWriter(path, "phi3")
    # llama.cpp gives Phi-3's control tokens rstrip only when general.name contains "phi3"/"phi-3".
    w.add_name("pocketlm builtin phi3")
    w.add_context_length(4096)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_id)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_builtin_tokenizer_matches_llama_cpp(hf_tokenizer, data_root, tmp_path):
    """llama.cpp, given the same vocabulary, tokenizes chat text and verse exactly as tokenizer.json."""
    import llama_cpp
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(BUILTIN / "tokenizer.model"))
    tj = json.loads((BUILTIN / "tokenizer.json").read_text(encoding="utf-8"))
    added = sorted((t["id"], t["content"]) for t in tj["added_tokens"] if t["id"] >= sp.get_piece_size())
    write_vocab_gguf(tmp_path / "vocab.gguf", sp, added, hf_tokenizer.eos_token_id)
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    texts = [
        "<|system|>\nYou are a poet.<|end|>\n<|user|>\n  Hail, Caesar!<|end|>\n<|assistant|>\nO<|end|>\n",
        "<|endoftext|> after, 1623 café\n\n",
        corpus.read_work(corpus.corpus_files("calib", data_root)[0])[:8000],
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_tokenizer(text).input_ids
