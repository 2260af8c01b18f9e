"""Helpers shared by the quantizer tests (loaded by path: tests/ is not a package).

- `make_checkpoint`: a random Phi-3 checkpoint folder WITH a tokenizer (the first tokens of the real
  Phi-3 vocabulary from the vocab-only GGUF in tests/data), since every GGUF file carries its vocabulary;
  norm weights are random around 1 so that no two channels scale alike (all-ones norms make
  llama.cpp's activation rounding hit exact ties, see `evaluate.llama_cpp_round_activations`).
- `llama_cpp_logits`: logits of a token sequence from llama-cpp-python's low-level API.
- `ggml_quantize`: llama.cpp's own block quantizer, called in its shared library.
- `llama_cpp_greedy`: llama.cpp's greedy tokens (and top-2 logit gaps) from a GGUF, in a child process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

PHI3_VOCAB = Path(__file__).resolve().parent / "data" / "phi3" / "ggml-vocab-phi-3.gguf"  # tests/data


def phi3_vocabulary(size: int) -> dict:
    """The first `size` tokens of Phi-3's vocabulary as GGUF tokenizer fields (<unk> <s> </s>, the
    256 byte tokens, then the highest-priority merges; anything else encodes through bytes)."""
    from pocketlm.export.gguf_reader import GGUFReader

    with GGUFReader(PHI3_VOCAB) as r:
        fields = r.tokenizer_fields()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        fields[key] = fields[key][:size]
    fields["tokenizer.ggml.eos_token_id"] = 2
    fields.pop("tokenizer.ggml.padding_token_id")
    return fields


def make_checkpoint(out: Path, hidden: int = 256, layers: int = 2, kind: str = "gqa", seed: int = 0,
                    vocab: int = 1024, **overrides) -> Path:
    import torch
    import transformers

    from pocketlm.tokenizer import Tokenizer

    spec = importlib.util.spec_from_file_location("_conftest", Path(__file__).with_name("conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tiny_hf_config = conftest.tiny_hf_config
    cfg = tiny_hf_config(kind, hidden_size=hidden, intermediate_size=2 * hidden, vocab_size=vocab,
                         num_hidden_layers=layers, **overrides)
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    Tokenizer.from_gguf_fields(phi3_vocabulary(vocab), PHI3_VOCAB).write_hf_files(out)
    return out


def llama_cpp_logits(path: Path, tokens: list[int], separate: bool = False) -> np.ndarray:
    """[T, V] float32 from llama.cpp, all positions in one batch (separate=True: each token is a
    sequence of its own, at position 0).

    Settings that make llama.cpp's float arithmetic comparable with ours: float32 KV cache, no
    flash attention (which rounds K/Q to fp16), and no "extra" buffer types: the AMX/repack weight
    layouts of this llama-cpp-python build crash (segfault) on quantized tensors on this machine."""
    import llama_cpp

    mp = llama_cpp.llama_model_default_params()
    mp.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp could not load {path}"
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(len(tokens), 8)
    cp.n_seq_max = len(tokens) if separate else 1
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(len(tokens), 0, len(tokens) if separate else 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i], batch.n_seq_id[i], batch.logits[i] = t, 1, 1
            batch.pos[i], batch.seq_id[i][0] = (0, i) if separate else (i, 0)
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        return np.array([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                         for i in range(len(tokens))], dtype=np.float32)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def llama_cpp_quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer: ftype_name e.g. "Q4_0", "Q4_K_M", "Q8_0", "Q5_K_M"."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return dst


def ggml_quantize(x: np.ndarray, gtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantizer (ggml_quantize_chunk) on x [rows, K] -> bytes [rows, row_bytes]."""
    import ctypes
    import os

    import llama_cpp

    from pocketlm.quantize.formats import row_bytes

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], row_bytes(gtype, x.shape[1])), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_init(int(gtype))
    n = lib.ggml_quantize_chunk(int(gtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if im is None else im.ctypes.data)
    assert n == out.size
    return out


# A different greedy choice than llama.cpp's is accepted only at a near-tie: its top two logits
# within this many logit units (it rounds activations to int8 blocks with fp16 scales, we keep fp32
# or round with fp32 scales: logits differ by ~0.3 %).
NEAR_TIE = 0.05

_LLAMA_GREEDY = """
import json, sys, numpy as np, llama_cpp
from llama_cpp import llama as L
default = llama_cpp.llama_model_default_params
def params():
    p = default(); p.use_extra_bufts = False; return p   # this build crashes in its AMX/repack path
L.llama_cpp.llama_model_default_params = params
path, ids, n, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=256, n_threads=threads, logits_all=False, verbose=False)
llm.eval(ids)
out, gaps = [], []
for _ in range(n):
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    top2 = np.sort(logits)[-2:]
    out.append(int(np.argmax(logits))); gaps.append(float(top2[1] - top2[0]))
    llm.eval([out[-1]])
print(json.dumps({"tokens": out, "gaps": gaps}))
"""


def llama_cpp_greedy(path, prompt: list[int], n: int, threads: int = 2) -> tuple[list[int], list[float]]:
    """llama.cpp's n greedy tokens after `prompt` and its top-2 logit gap at each step (a child
    process: a llama.cpp crash must not take the test run down)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-P", "-c", _LLAMA_GREEDY, str(path), json.dumps(prompt), str(n),
                           str(threads)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["tokens"], result["gaps"]
