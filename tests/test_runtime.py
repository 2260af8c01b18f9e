"""The runtime's model loop against independent oracles, and its handling of bad input.

- F32 files (numpy path, no quantization anywhere): logits equal the reference forward pass
  (`Phi3Reference`, itself checked against transformers) to float32 rounding, whole prompt and token
  by token, for MHA, GQA, LongRoPE (both factor policies, each against the reference under that
  policy's rule) and sliding-window configs: this pins RoPE, attention, GQA, the window and the cache.
- Quantized files, each block type (hidden 256 fixtures for the K-quants): logits agree with the
  reference run on the file's dequantized weights within the error of int8 activations.
- llama.cpp (llama-cpp-python) on the very same files: the same greedy tokens (see test_generate.py
  for the built-in model) and close logits.
- Bad input: another architecture, a tensor type the kernel lacks, a NaN block scale, a prompt
  longer than the context, threads < 1, out-of-range token ids: one PocketLMError each.
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.export.gguf_reader import GGUFReader
from pocketlm.export.gguf_writer import GGUFWriter
from pocketlm.kv_cache import KVCache
from pocketlm.quantize.formats import GGMLType
from pocketlm.reference import Phi3Reference
from pocketlm.runtime import _kernel
from pocketlm.runtime.model import load

sys.path.insert(0, str(Path(__file__).parent))
files = importlib.import_module("gguf_files")
conftest = importlib.import_module("conftest")

REPO = Path(__file__).resolve().parents[1]
RNG_SEED = 1234
Q = GGMLType
# hidden 64 for the 32-value block types, 256 for the K-quants (their rows are 256-value blocks)
BLOCK_HIDDEN = {Q.Q4_0: 64, Q.Q4_1: 64, Q.Q8_0: 64, Q.Q4_K: 256, Q.Q6_K: 256}


def tiny_config(kind: str, hidden: int = 64) -> Phi3Config:
    extra = {} if hidden == 64 else dict(hidden_size=hidden, intermediate_size=2 * hidden)
    return Phi3Config.from_hf_dict(conftest.tiny_hf_config(kind, **extra).to_dict())


def random_weights(cfg: Phi3Config, seed: int = RNG_SEED) -> dict[str, np.ndarray]:
    """Random Phi-3 weights: linear layers N(0, 1/sqrt(in)) * 0.8, norms around 1."""
    rng = np.random.default_rng(seed)
    w = {}
    for s in tensor_specs(cfg):
        if s.kind == "norm":
            w[s.name] = (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        elif s.kind == "rope_factors":
            continue
        else:
            w[s.name] = (0.8 / np.sqrt(s.shape[-1]) * rng.standard_normal(s.shape)).astype(np.float32)
    return files.longrope_weights(cfg, w)


@pytest.fixture(scope="module")
def make_file(tmp_path_factory):
    """(kind, gtype, hidden) -> (path, config): a random tiny model written in that block type."""
    made = {}

    def make(kind: str, gtype: GGMLType, hidden: int = 64) -> tuple[Path, Phi3Config]:
        key = (kind, gtype, hidden)
        if key not in made:
            cfg = tiny_config(kind, hidden)
            path = tmp_path_factory.mktemp("gguf") / f"{kind}-{hidden}-{gtype.name}.gguf"
            files.write_gguf(path, cfg, random_weights(cfg), gtype)
            made[key] = (path, cfg)
        return made[key]

    return make


def reference_logits(path: Path, cfg: Phi3Config, ids: list[int], step: bool = False) -> np.ndarray:
    """The reference's logits [T, V] on the file's dequantized weights (token by token with `step`)."""
    ref = Phi3Reference(cfg, files.dequantized_weights(path))
    if not step:
        return ref.forward(ids)
    cache = ref.new_cache()
    return np.concatenate([ref.forward([t], cache) for t in ids])


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def prompt(cfg: Phi3Config, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


# ---------------------------------------------------------------------------- exact loop (F32)

@pytest.mark.parametrize("kind", ["mha", "gqa", "swa"])
def test_f32_logits_equal_reference_whole_prompt_and_token_by_token(make_file, kind):
    path, cfg = make_file(kind, Q.F32)
    ids = prompt(cfg, 40)  # longer than the sliding window (8) of "swa"
    want = reference_logits(path, cfg, ids)
    model = load(path, threads=1, ctx=64, kv="f32")
    atol = 2e-5 * np.abs(want).max()
    np.testing.assert_allclose(model.forward(ids, all_logits=True), want, rtol=0, atol=atol)
    model.reset()
    steps = np.stack([model.forward([t]) for t in ids])
    np.testing.assert_allclose(steps, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_f32_prefill_in_chunks_and_after_a_cached_prefix_equals_one_pass(make_file):
    path, cfg = make_file("swa", Q.F32)
    ids = prompt(cfg, 50, seed=3)
    want = reference_logits(path, cfg, ids)
    model = load(path, threads=1, ctx=64, kv="f32", batch=7)  # chunks of 7 cross the window
    got = model.forward(ids, all_logits=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    model.reset()
    model.forward(ids[:20])
    np.testing.assert_allclose(model.forward(ids[20:], all_logits=True), want[20:], rtol=0,
                               atol=2e-5 * np.abs(want).max())
    # prefill() keeps the shared prefix: only the differing tail is evaluated
    np.testing.assert_allclose(model.prefill(ids[:30]), want[29], rtol=0, atol=2e-5 * np.abs(want).max())
    assert model.n_past == 30


def test_longrope_sequence_policy_matches_reference_crossing_the_original_context(make_file):
    """HF's rule (the reference): factors switch when the sequence passes original context (64)."""
    path, cfg = make_file("longrope", Q.F32)
    assert cfg.rope_scaling is not None and cfg.original_max_position_embeddings == 64
    ids = prompt(cfg, 80, seed=1)
    model = load(path, threads=1, ctx=128, kv="f32", longrope="sequence")
    want_steps = reference_logits(path, cfg, ids, step=True)       # short until 64, then long
    got = np.stack([model.forward([t]) for t in ids])
    np.testing.assert_allclose(got, want_steps, rtol=0, atol=2e-5 * np.abs(want_steps).max())
    # the two factor sets really differ here, so the test would see a wrong switch
    model.reset()
    whole = reference_logits(path, cfg, ids)                        # long for every position
    assert rel_error(whole[:64], want_steps[:64]) > 1e-2


def test_longrope_context_policy_uses_long_factors_iff_context_exceeds_original(make_file):
    """llama.cpp's rule: n_ctx > original context -> long factors for every position. The reference
    agrees with it on a whole prompt longer than the original context (it then uses long factors
    everywhere), and on any prompt when n_ctx <= original context (short factors)."""
    path, cfg = make_file("longrope", Q.F32)
    ids = prompt(cfg, 80, seed=2)
    want = reference_logits(path, cfg, ids)
    model = load(path, threads=1, ctx=128, kv="f32")               # 128 > 64: long everywhere
    assert model.longrope == "context"
    atol = 2e-5 * np.abs(want).max()
    np.testing.assert_allclose(model.forward(ids, all_logits=True), want, rtol=0, atol=atol)
    model.reset()
    np.testing.assert_allclose(np.stack([model.forward([t]) for t in ids]), want, rtol=0, atol=atol)
    short = load(path, threads=1, ctx=64, kv="f32")                # 64 <= 64: short everywhere
    want_short = reference_logits(path, cfg, ids[:50])
    np.testing.assert_allclose(short.forward(ids[:50], all_logits=True), want_short, rtol=0,
                               atol=2e-5 * np.abs(want_short).max())


# ---------------------------------------------------------------------------- quantized blocks

# Relative (Frobenius) error of the logits against the fp32 reference on the same dequantized
# weights: what int8 activations cost (one scale per 32 values, per 256 for the K-quants). Measured
# 1.4-2.7 % on these random models (llama.cpp, which also quantizes activations, is as far away).
# (Comparing with a reference fed int8-rounded activations is no tighter: any 1e-6 difference moves
# some activations across a rounding boundary, and each move costs a whole int8 step.)
INT8_ACT_TOL = 3e-2


@pytest.mark.parametrize("gtype", list(BLOCK_HIDDEN), ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["mha", "gqa", "longrope", "swa", "partial", "partial-longrope"])
def test_quantized_logits_agree_with_reference_on_dequantized_weights(make_file, kind, gtype):
    path, cfg = make_file(kind, gtype, BLOCK_HIDDEN[gtype])
    ids = prompt(cfg, 72 if "longrope" in kind else 24, seed=5)
    want = reference_logits(path, cfg, ids)
    model = load(path, threads=2, ctx=128, kv="f32")
    whole = model.forward(ids, all_logits=True)
    model.reset()
    steps = np.stack([model.forward([t]) for t in ids])
    assert rel_error(whole, want) < INT8_ACT_TOL
    assert rel_error(steps, want) < INT8_ACT_TOL


@pytest.mark.parametrize("kv", ["f16", "f32", "int8"])
@pytest.mark.parametrize("kind", ["mha", "gqa", "longrope", "swa", "partial", "partial-longrope"])
def test_kernel_decode_step_equals_the_chunk_loop(make_file, kind, kv):
    """decode_step (every layer in one C call) against the prompt-chunk loop with one token (a kernel
    call per step: norm, matmul, attention...), token by token past the window and the original
    context. Each step starts from the same cache (copied over), so a one-code difference in a
    cached int8 row cannot snowball."""
    path, cfg = make_file(kind, Q.Q4_0)
    ids = prompt(cfg, 72 if "longrope" in kind else 24, seed=9)
    fused = load(path, threads=2, ctx=128, kv=kv, longrope="sequence")
    loop = load(path, threads=2, ctx=128, kv=kv, longrope="sequence")
    loop._decode_plan = lambda: None  # the chunk path
    assert fused._decode_plan() is not None
    arrays = ["k", "v"] + (["k_scale", "v_scale"] if kv == "int8" else [])
    errors = []
    for pos, t in enumerate(ids):
        for name in arrays:
            getattr(fused.cache, name)[:] = getattr(loop.cache, name)
        errors.append(rel_error(fused.forward([t]), loop.forward([t])))
        for name in ("k", "v"):  # the row this step wrote, dequantized
            rows = []
            for model in (fused, loop):
                row = getattr(model.cache, name)[:, :, pos].astype(np.float32)     # [layers, KV, hd]
                if kv == "int8":
                    row *= getattr(model.cache, f"{name}_scale")[:, :, pos, None].astype(np.float32)
                rows.append(row)
            # int8 activations upstream and the cache's own int8 rounding move a value by a few
            # steps at most; fp16/f32 rows agree to float rounding
            tol = INT8_ACT_TOL * np.abs(rows[1]).max() if kv == "int8" else 2e-3
            np.testing.assert_allclose(rows[0], rows[1], rtol=2e-3, atol=tol)
    # float rounding (3e-7 typical); a sum that lands the other side of an int8 activation's
    # rounding boundary moves one step by up to INT8_ACT_TOL
    assert np.median(errors) < 1e-5 and max(errors) < INT8_ACT_TOL, errors


@pytest.mark.parametrize("kv", ["f16", "f32", "int8"])
@pytest.mark.parametrize("kind", ["gqa", "swa", "partial-longrope"])
def test_kernel_rows_equal_the_chunk_loop_bit_for_bit(make_file, kind, kv):
    """forward_rows (T tokens through every layer in one C call: a verify, a short prompt) against the
    per-layer loop of kernel calls: the same calls in the same order, so the same logits and cache
    rows bit for bit, across the window and the original context."""
    path, cfg = make_file(kind, Q.Q4_0)
    ids = prompt(cfg, 100, seed=11)
    fused = load(path, threads=2, ctx=128, kv=kv, longrope="sequence")
    loop = load(path, threads=2, ctx=128, kv=kv, longrope="sequence")
    loop._decode_plan = lambda: None  # the chunk path
    arrays = ["k", "v"] + (["k_scale", "v_scale"] if kv == "int8" else [])
    pos = 0
    for t in (2, 16, 5, 9, 1, 16, 3, 16, 7, 16):  # 91 positions: past the window (8) and the original context (64)
        chunk = ids[pos:pos + t]
        a, b = fused.forward(chunk, all_logits=True), loop.forward(chunk, all_logits=True)
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=f"{t} rows at {pos}")
        for name in arrays:
            np.testing.assert_array_equal(getattr(fused.cache, name)[:, :, :pos + t],
                                          getattr(loop.cache, name)[:, :, :pos + t])
        pos += t
    last = fused.forward(ids[pos:pos + 4])          # the last row's logits only
    np.testing.assert_array_equal(last, loop.forward(ids[pos:pos + 4]))


def test_decode_plan_and_step_check_their_arguments(make_file):
    path, cfg = make_file("gqa", Q.Q4_0)
    model = load(path, threads=1, ctx=32)
    L = model.layers[0]
    lin = [x.plan() for x in (L.qkv, L.o, L.gate_up, L.down)]
    norms = (L.attn_norm.weight, None, L.ffn_norm.weight, None)
    dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, 32, 0, cfg.rms_norm_eps, 0, 0, 0.0, cfg.attention_scale, cfg.head_dim)
    k, v = model.cache.k[:1], model.cache.v[:1]  # one layer's worth
    plan = _kernel.decode_plan([(*norms, *lin, None)], dims, k, v)
    h = np.ones(cfg.hidden_size, np.float32)
    cos, sin = (np.ones(cfg.head_dim // 2, np.float32),) * 2
    bias = np.zeros(cfg.hidden_size, np.float32)
    bad_plans = {
        "layer 0 qkv": lambda: _kernel.decode_plan([(*norms, lin[1], lin[0], *lin[2:], None)], dims, k, v),
        "attn_norm has": lambda: _kernel.decode_plan([(L.attn_norm.weight[:-1], *norms[1:], *lin, None)], dims, k, v),
        "RMSNorm has no bias": lambda: _kernel.decode_plan([(norms[0], bias, *norms[2:], *lin, None)], dims, k, v),
        "attn_norm bias is required": lambda: _kernel.decode_plan([(*norms, *lin, None)],
                                                                  (*dims[:8], 1, *dims[9:]), k, v),
        "o has": lambda: _kernel.decode_plan([(*norms, lin[0], (*lin[1][:2], bias[:-1]), *lin[2:], None)],
                                             dims, k, v),
        "block-sparse pattern": lambda: _kernel.decode_plan([(*norms, *lin, (16, 0, 4, 1))], dims, k, v),
        "k_cache has": lambda: _kernel.decode_plan([(*norms, *lin, None)], dims, model.cache.k, v),
        "bad model dimensions": lambda: _kernel.decode_plan([(*norms, *lin, None)], (*dims[:3], 15, *dims[4:]), k, v),
        "attention scale": lambda: _kernel.decode_plan([(*norms, *lin, None)], (*dims[:11], 0.0, dims[12]), k, v),
        "rotary 15": lambda: _kernel.decode_plan([(*norms, *lin, None)], (*dims[:12], 15), k, v),
        r"activation 1 \(limit 0\)": lambda: _kernel.decode_plan([(*norms, *lin, None)],
                                                             (*dims[:9], 1, 0.0, *dims[11:]), k, v),
        "outside the cache": lambda: _kernel.decode_step(plan, h, cos, sin, 32),
        "NaN or infinity": lambda: _kernel.decode_step(plan, np.full_like(h, np.nan), cos, sin, 0),
        "cos has": lambda: _kernel.decode_step(plan, h, cos[:-1], sin, 0),
        r"positions 31..32 are outside the cache's 32": lambda: _kernel.forward_rows(
            plan, np.ones((2, h.size), np.float32), np.ones((2, cos.size), np.float32),
            np.ones((2, cos.size), np.float32), 31),
        r"h must be \[T, 64\]": lambda: _kernel.forward_rows(plan, np.ones((2, 63), np.float32), cos, sin, 0),
        "NaN or infinity at element 65": lambda: _kernel.forward_rows(
            plan, np.where(np.arange(128) == 65, np.nan, 1).astype(np.float32).reshape(2, 64),
            np.ones((2, cos.size), np.float32), np.ones((2, cos.size), np.float32), 0),
        "sin has": lambda: _kernel.forward_rows(plan, np.ones((2, h.size), np.float32),
                                                np.ones((2, cos.size), np.float32), sin, 0),
    }
    for message, call in bad_plans.items():
        with pytest.raises((ValueError, TypeError), match=message):
            call()
    _kernel.decode_step(plan, h, cos, sin, 0)
    assert np.isfinite(h).all()


@pytest.mark.parametrize("kv", ["f16", "int8"])
def test_kv_cache_types_stay_close_to_f32(make_file, kv):
    """On F32 weights (no activation rounding to amplify differences)."""
    path, cfg = make_file("gqa", Q.F32)
    ids = prompt(cfg, 40, seed=6)
    want = load(path, threads=1, ctx=64, kv="f32").forward(ids, all_logits=True)
    model = load(path, threads=1, ctx=64, kv=kv)
    got = model.forward(ids, all_logits=True)
    assert rel_error(got, want) < (1e-3 if kv == "f16" else 1e-2)
    model.reset()
    assert rel_error(np.stack([model.forward([t]) for t in ids]), want) < (1e-3 if kv == "f16" else 1e-2)


def test_int8_kv_cache_halves_memory():
    f16 = KVCache(4, 8, 512, 96, "f16")
    i8 = KVCache(4, 8, 512, 96, "int8")
    assert f16.nbytes == 2 * 4 * 8 * 512 * 96 * 2
    assert i8.nbytes / f16.nbytes < 0.52


def test_kv_cache_costs_only_the_positions_written():
    """The cache is reserved, not touched: a short prompt at n_ctx 4096 costs its own pages (numpy's
    huge pages zeroed all 1.6 GB of a phi-3-mini cache for a 12-token prompt, 3 s)."""
    from pocketlm.hostinfo import memory_status

    before = memory_status()["RssAnon"]
    cache = KVCache(32, 32, 4096, 96, "f16")  # phi-3-mini: 805 MB per k and v
    cache.k[:, :, :12] = 1.0
    cache.v[:, :, :12] = 1.0
    grown = memory_status()["RssAnon"] - before
    if before:  # Linux: 2 x 32 x 32 rows touch one 4 KB page each (8 MB), never the 1.6 GB
        assert grown < 64 << 20, grown
    assert cache.k.flags.writeable and not cache.k[:, :, 12:].any() and cache.nbytes == 2 * 32 * 32 * 4096 * 96 * 2


@pytest.mark.parametrize("gtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_repacked_weights_give_the_same_logits_in_memory_and_from_the_cache_file(tmp_path, monkeypatch, capfd,
                                                                                gtype):
    """Matrices in the kernel's packed layouts (where the CPU has a kernel for them): the same
    logits as the zero-copy path, repacked in memory (small models, repack="memory" = --no-cache)
    or mapped from the cache file, whose writing is announced on stderr with its size."""
    from pocketlm.runtime import kernel, packed_cache

    cfg = tiny_config("gqa", 512)
    if not kernel.should_repack(gtype, cfg.hidden_size):
        pytest.skip(f"no packed {gtype.name} kernel on the {kernel.active_path()} path")
    path = files.write_gguf(tmp_path / f"{gtype.name}.gguf", cfg, random_weights(cfg), gtype)
    ids = prompt(cfg, 12)
    plain = load(path, threads=2, ctx=32, repack=False)
    want = np.stack([plain.forward([t]) for t in ids])
    assert plain.layers[0].qkv.gtype == gtype
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    packed = load(path, threads=2, ctx=32)
    assert packed.layers[0].qkv.gtype == kernel.packed_type(gtype)
    # float summation order differs, and int8 activation rounding amplifies that (INT8_ACT_TOL;
    # Q4_K's 256-value activation blocks move most)
    assert rel_error(np.stack([packed.forward([t]) for t in ids]), want) < INT8_ACT_TOL
    monkeypatch.setattr(packed_cache, "MIN_CACHED_BYTES", 0)
    memory = load(path, threads=2, ctx=32, repack="memory")  # --no-cache: no file even above the threshold
    assert not isinstance(memory.layers[0].qkv.raw, np.memmap) and not (tmp_path / "cache" / "packed").exists()
    assert rel_error(np.stack([memory.forward([t]) for t in ids]), want) < INT8_ACT_TOL
    capfd.readouterr()
    for i in range(2):  # the first load writes the cache file (and says so), the second maps it
        cached = load(path, threads=2, ctx=32)
        err = capfd.readouterr().err
        assert ("writing its weights" in err and " GB" in err) == (i == 0), err
        assert isinstance(cached.layers[0].qkv.raw, np.memmap)
        assert rel_error(np.stack([cached.forward([t]) for t in ids]), want) < INT8_ACT_TOL
    copies = packed_cache.cached_copies(str(path))
    assert len(copies) == 1 and copies[0][2] and copies[0][1] > 0
    from pocketlm.export.gguf_info import describe_gguf
    assert str(copies[0][0]) in describe_gguf(path)


# ---------------------------------------------------------------------------- llama.cpp

def llama_cpp_logits(path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    """llama.cpp's logits of the last token after `ids` (in a subprocess: a crash fails the test,
    not the session). Extra buffer types (repacked weights) are off: this build crashes on them with
    tiny shapes; the benchmark runs with them on."""
    code = f"""
import sys, numpy as np, llama_cpp
from llama_cpp import llama as L
default = llama_cpp.llama_model_default_params
def params():
    p = default(); p.use_extra_bufts = False; return p
L.llama_cpp.llama_model_default_params = params
llm = llama_cpp.Llama({str(path)!r}, n_ctx={n_ctx}, n_threads=1, logits_all=False, verbose=False)
llm.eval({ids!r})
out = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
sys.stdout.buffer.write(out.astype(np.float32).tobytes())
"""
    res = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    return np.frombuffer(res.stdout, dtype=np.float32)


@pytest.mark.parametrize("kind", ["gqa", "longrope"])
def test_logits_agree_with_llama_cpp_on_the_same_file(kind, data_root, tmp_path):
    """llama.cpp quantizes activations too (fp16 scales) and keeps an f16 cache: a few % apart.
    The tiny model gets the real Phi-3 vocabulary (llama.cpp insists on a valid one)."""
    pytest.importorskip("llama_cpp")
    cfg = dataclasses.replace(tiny_config(kind), vocab_size=32064)
    path = files.write_gguf(tmp_path / f"{kind}.gguf", cfg, random_weights(cfg), Q.Q8_0,
                            files.phi3_vocab_fields(data_root))
    ids = prompt(cfg, 72 if "longrope" in kind else 24, seed=8)   # longrope: n_ctx 128 > 64 -> long
    theirs = llama_cpp_logits(path, ids, n_ctx=128)
    ours = load(path, threads=1, ctx=128).forward(ids)
    assert rel_error(ours, theirs) < 3e-2
    assert int(np.argmax(ours)) == int(np.argmax(theirs))


# ---------------------------------------------------------------------------- context and bad input

def test_prompt_longer_than_context_is_a_clear_error(make_file):
    path, cfg = make_file("mha", Q.Q8_0)
    model = load(path, threads=1, ctx=16)
    with pytest.raises(PocketLMError, match="do not fit the context of 16"):
        model.forward(prompt(cfg, 17))
    model.forward(prompt(cfg, 16))  # exactly the context is fine
    with pytest.raises(PocketLMError, match="context"):
        model.forward([1])


def test_bad_arguments_are_clear_errors(make_file):
    path, cfg = make_file("mha", Q.Q8_0)
    for threads in (0, -2):
        with pytest.raises(PocketLMError, match="threads"):
            load(path, threads=threads)
    with pytest.raises(PocketLMError, match="exceeds the model's maximum"):
        load(path, ctx=cfg.max_position_embeddings + 1)
    with pytest.raises(PocketLMError, match="kv"):
        load(path, kv="q4")
    model = load(path, threads=1, ctx=16)
    with pytest.raises(PocketLMError, match="out of range"):
        model.forward([cfg.vocab_size])
    with pytest.raises(PocketLMError, match="out of range"):
        model.forward([-1])


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    with GGUFWriter(path, {"general.architecture": "llama", "llama.block_count": 1},
                    [("token_embd.weight", Q.F32, (4, 32))]) as w:
        w.write_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    with pytest.raises(PocketLMError, match="architecture 'llama' is not supported"):
        load(path)


def test_tensor_type_the_kernel_lacks_is_refused(tmp_path, make_file):
    """A Q5_K attn_qkv (what llama.cpp's Q4_K_M uses) is named in the error, not run."""
    cfg = tiny_config("mha", 256)
    w = random_weights(cfg)
    name = "blk.0.attn_qkv.weight"
    path = tmp_path / "q5k.gguf"
    md = cfg.to_gguf_metadata()
    specs = tensor_specs(cfg)
    q5k = 13  # Q5_K: 256 values in 176 bytes
    with GGUFWriter(path, md, [(s.name, q5k if s.name == name else Q.F32, s.shape) for s in specs]) as wr:
        for s in specs:
            if s.name == name:
                wr.write_tensor(name, np.zeros(s.shape[0] * s.shape[1] // 256 * 176, np.uint8))
            else:
                wr.write_tensor(s.name, w[s.name])
    with pytest.raises(PocketLMError, match=r"attn_qkv.weight.*Q5_K.*does not implement"):
        load(path)


def test_nan_block_scale_is_a_clear_error_never_text(tmp_path, make_file):
    src, _ = make_file("mha", Q.Q4_0)
    data = bytearray(src.read_bytes())
    with GGUFReader(src) as r:
        t = r.tensors["blk.1.ffn_down.weight"]
        offset = t.offset + 5 * 18               # block 5: its fp16 scale is the first 2 bytes
    data[offset:offset + 2] = np.array([np.nan], np.float16).tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(PocketLMError, match=r"blk.1.ffn_down.weight.*corrupt.*block 5"):
        load(bad, validate=True)
    model = load(bad)  # lazy validation: the first step that meets the block finds it
    with pytest.raises(PocketLMError, match=r"blk.1.ffn_down.weight.*corrupt.*block 5"):
        model.forward([1, 2, 3])
    with pytest.raises(PocketLMError, match=r"blk.1.ffn_down.weight.*corrupt.*block 5"):
        model.forward([4])
    assert model.n_past == 0


# ---------------------------------------------------------------------------- imports

def test_pocketlm_run_imports_no_torch_transformers_or_onnx(data_root, tmp_path):
    """`pocketlm run` itself, with -X importtime: every module it imports is listed on stderr."""
    cfg = dataclasses.replace(tiny_config("gqa"), vocab_size=32064)
    path = files.write_gguf(tmp_path / "run.gguf", cfg, random_weights(cfg), Q.Q8_0,
                            files.phi3_vocab_fields(data_root))
    res = subprocess.run([sys.executable, "-P", "-X", "importtime", "-m", "pocketlm.cli", "run", str(path), "-p",
                          "Hello", "-n", "4", "--temp", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines()
                if line.startswith("import time:")}
    assert "numpy" in imported and "pocketlm" in imported
    heavy = {"torch", "transformers", "onnx", "onnxruntime", "onnxruntime_genai", "llama_cpp", "gguf",
             "safetensors", "tokenizers", "jinja2"}
    assert not imported & heavy


@pytest.mark.parametrize(("kind", "tol"), [("f32", 0.0), ("f16", 1e-3), ("int8", 1e-2)])
def test_kv_cache_reads_back_what_was_written(kind, tol):
    """read() gives positions 0..end-1 as float32, to the storage type's rounding."""
    cache = KVCache(2, 3, 16, 8, kind)
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 3, 10, 8), dtype=np.float32)
    cache.write(1, 0, k[:, :6], v[:, :6])
    cache.write(1, 6, k[:, 6:], v[:, 6:])
    got_k, got_v = cache.read(1, 10)
    assert got_k.dtype == np.float32 and got_k.shape == (3, 10, 8)
    np.testing.assert_allclose(got_k, k, atol=tol * np.abs(k).max(), rtol=0)
    np.testing.assert_allclose(got_v, v, atol=tol * np.abs(v).max(), rtol=0)
