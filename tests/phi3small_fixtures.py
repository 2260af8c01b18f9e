"""Tiny random Phi-3-small (`Phi3SmallForCausalLM`) checkpoints laid out exactly as Microsoft ships
them on Hugging Face (the project's Phi-3-small notes, PHI3_SMALL.md sections 1, 2 and 5):

- config.json with Microsoft's field names (`ff_intermediate_size`, `gegelu_limit`, `blocksparse_*`,
  `dense_attention_every_n_layers`, `mup_*`, `rope_embedding_base`, `layer_norm_epsilon`), the
  misleading `attention_bias: false` and no `tie_word_embeddings` key (the embedding is the output);
- sharded safetensors `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, bf16 or
  f32, HF tensor names, head-major `query_key_value` rows, interleaved `up_proj` rows, a bias on every
  linear and LayerNorm, no `lm_head.weight`, optionally the `rotary_emb.inv_freq` buffer of the 8k
  model (to be ignored by readers).

Vocabulary scaling: the real vocab is 100256 BPE ranks + 96 special ids (100256..100351). A fixture of
`vocab` ids keeps the 96 special ids at the top with the same offsets: special id s of the real model
becomes s - 100256 + (vocab - 96). So bos = eos = `<|endoftext|>` = vocab - 96 + 1, and the 91 dummy ids
are the real list shifted the same way. The real config.json does not carry `dummy_token_indices`
(the real config class derives it from the tokenizer); re-saved configs do, and a small-vocab fixture
has no tokenizer to derive them from, so the fixture writes them into config.json as a list.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

N_SPECIAL = 96  # ids 100256..100351 of the real vocabulary (PHI3_SMALL.md section 5)
REAL_FIRST_SPECIAL = 100256
# Offsets (from 100256) of the 91 dummy ids: <|dummy_id_*|>, the three fim tokens and <|endofprompt|>.
DUMMY_OFFSETS: list[int] = [0, 2, 3, 4, 8, 9, *range(11, 96)]
ENDOFTEXT_OFFSET = 1  # 100257 <|endoftext|>: bos = eos = pad
END_OFFSET = 10  # 100266 <|end|>


def dummy_token_ids(vocab: int) -> list[int]:
    """The 91 masked ids of a `vocab`-sized fixture (the real list 100256, 100258, ... shifted)."""
    first = vocab - N_SPECIAL
    return [first + o for o in DUMMY_OFFSETS]


def phi3small_config(*, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 1, ff: int = 96,
                     vocab: int = 352, block_size: int = 16, local_blocks: int = 2, vert_stride: int = 4,
                     homo_head: bool = False, dense_every_n: int = 2, max_pos: int = 512,
                     longrope: str | None = None, original_max: int = 64,
                     rope_base: float = 1000000.0, rope_position_scale: float = 1.0,
                     mup_embedding_multiplier: float = 10.0, mup_width_multiplier: float = 8.0,
                     mup_attn_multiplier: float = 1.0, mup_use_scaling: bool = True,
                     gegelu_limit: float = 20.0, mscales: tuple[float, float] = (1.0, 1.1902380714238083),
                     rope_type: str = "su", dtype: str = "bf16", seed: int = 0) -> dict:
    """config.json as a dict, in the style of microsoft/Phi-3-small-{8k,128k}-instruct.

    longrope=None: the 8k layout (max_position_embeddings = max_pos, no rope_scaling).
    longrope="128k": max_position_embeddings = max_pos > original_max_position_embeddings = original_max,
    rope_scaling {type, short_factor, long_factor, original_max_position_embeddings, short_mscale,
    long_mscale} with made-up factors of length head_dim/2; `mscales` = (short, long), a value <= 0
    means "use the default" (1.0 short, sqrt(1 + ln(max/orig)/ln(orig)) long; PHI3_SMALL.md 3.7).
    """
    if vocab <= N_SPECIAL:
        raise ValueError(f"vocab must exceed the {N_SPECIAL} special ids")
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")
    head_dim = hidden // heads
    bos = vocab - N_SPECIAL + ENDOFTEXT_OFFSET
    cfg: dict = {
        "_name_or_path": "Phi-3-small-128k-instruct" if longrope else "Phi-3-small-8k-instruct",
        "architectures": ["Phi3SmallForCausalLM"],
        "attention_bias": False,  # misleading, as in Microsoft's file: the biases exist
        "attention_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
            "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
            "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
        },
        "blocksparse_block_size": block_size,
        "blocksparse_homo_head_pattern": homo_head,
        "blocksparse_num_local_blocks": local_blocks,
        "blocksparse_triton_kernel_block_size": block_size,
        "blocksparse_vert_stride": vert_stride,
        "bos_token_id": bos,
        "dense_attention_every_n_layers": dense_every_n,
        "dummy_token_indices": dummy_token_ids(vocab),
        "embedding_dropout_prob": 0.1,
        "eos_token_id": bos,
        "ff_dim_multiplier": None,
        "ff_intermediate_size": ff,
        "ffn_dropout_prob": 0.1,
        "gegelu_limit": gegelu_limit,
        "gegelu_pad_to_256": True,
        "hidden_act": "gegelu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "max_position_embeddings": max_pos,
        "model_type": "phi3small",
        "mup_attn_multiplier": mup_attn_multiplier,
        "mup_embedding_multiplier": mup_embedding_multiplier,
        "mup_use_scaling": mup_use_scaling,
        "mup_width_multiplier": mup_width_multiplier,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_sequence_to_multiple_of_64": True,
        "reorder_and_upcast_attn": False,
        "rope_embedding_base": rope_base,
        "rope_position_scale": rope_position_scale,
        "rope_scaling": None,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if longrope is not None:
        if longrope != "128k":
            raise ValueError(f"longrope must be None or '128k', not {longrope!r}")
        if not original_max < max_pos:
            raise ValueError("the 128k layout needs original_max < max_pos")
        rng = np.random.default_rng(seed + 1000)
        half = head_dim // 2
        # Made-up factors: short near 1, long growing with the dimension index (as LongRoPE's do),
        # rounded to 4 decimals like a hand-written config.
        short = (1.0 + 0.1 * rng.random(half)).round(4).tolist()
        long_ = (1.0 + np.linspace(0.0, 12.0, half) * (0.75 + 0.5 * rng.random(half))).round(4).tolist()
        cfg["max_position_embeddings"] = max_pos
        cfg["original_max_position_embeddings"] = original_max
        cfg["rope_scaling"] = {
            "long_factor": long_,
            "long_mscale": mscales[1],
            "original_max_position_embeddings": original_max,
            "short_factor": short,
            "short_mscale": mscales[0],
            "type": rope_type,
        }
    return cfg


def default_long_mscale(max_pos: int, original_max: int) -> float:
    """HF's long mscale when the config's is <= 0: sqrt(1 + ln(max/orig) / ln(orig)) (PHI3_SMALL.md 3.7)."""
    return math.sqrt(1 + math.log(max_pos / original_max) / math.log(original_max))


def _weights(cfg: dict, seed: int, inv_freq: bool) -> dict[str, np.ndarray]:
    """float32 weights under HF names, in HF module order. Scales are chosen so the forward pass is
    far from trivial: the residual stream starts at |h| ~ 10 (embedding x 10), attention logits
    (q.k / head_dim) spread over several units so softmax is peaked and the block mask changes the
    output, the GeGELU inputs u have std ~ 7 so that some exceed the limit 20 (the clamp matters),
    and LayerNorm weights/biases are far from 1/0."""
    rng = np.random.default_rng(seed)
    d, v, ff = cfg["hidden_size"], cfg["vocab_size"], cfg["ff_intermediate_size"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // h
    qkv_rows = (h + 2 * kv) * hd  # kv groups of (h/kv queries, 1 key, 1 value) blocks of hd rows

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def layer_norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": (1.0 + normal((d,), 0.3)),
                f"{prefix}.bias": normal((d,), 0.2)}

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal((v, d), 1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w.update(layer_norm(f"{p}.input_layernorm"))
        # [(h + 2 kv) * hd, d], rows head-major: group g = q(g*r+0..r-1), k(g), v(g); each block hd rows.
        w[f"{p}.self_attn.query_key_value.weight"] = normal((qkv_rows, d), 0.4)
        w[f"{p}.self_attn.query_key_value.bias"] = normal((qkv_rows,), 0.3)
        w[f"{p}.self_attn.dense.weight"] = normal((d, d), 1.5 / math.sqrt(d))
        w[f"{p}.self_attn.dense.bias"] = normal((d,), 0.3)
        if inv_freq:
            # The 8k RotaryEmbedding's persistent buffer [hd/2]: present in some files, ignored by readers.
            w[f"{p}.self_attn.rotary_emb.inv_freq"] = (
                1.0 / cfg["rope_embedding_base"] ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
        w.update(layer_norm(f"{p}.post_attention_layernorm"))
        # [2 ff, d], rows interleaved: row 2k = gelu input of unit k, row 2k+1 = its linear input.
        w[f"{p}.mlp.up_proj.weight"] = normal((2 * ff, d), 0.9)
        w[f"{p}.mlp.up_proj.bias"] = normal((2 * ff,), 1.0)
        w[f"{p}.mlp.down_proj.weight"] = normal((d, ff), 0.02)
        w[f"{p}.mlp.down_proj.bias"] = normal((d,), 0.3)
    w.update(layer_norm("model.final_layernorm"))
    return w


def make_phi3small_checkpoint(path: str | Path, *, hidden: int = 64, layers: int = 4, heads: int = 4,
                              kv_heads: int = 1, ff: int = 96, vocab: int = 352, block_size: int = 16,
                              local_blocks: int = 2, vert_stride: int = 4, homo_head: bool = False,
                              dense_every_n: int = 2, max_pos: int = 512, longrope: str | None = None,
                              original_max: int = 64, rope_base: float = 1000000.0,
                              rope_position_scale: float = 1.0, mup_embedding_multiplier: float = 10.0,
                              mup_width_multiplier: float = 8.0, mup_attn_multiplier: float = 1.0,
                              mup_use_scaling: bool = True, gegelu_limit: float = 20.0,
                              mscales: tuple[float, float] = (1.0, 1.1902380714238083), rope_type: str = "su",
                              seed: int = 0, dtype: str = "bf16", shards: int = 2, tie: bool = True,
                              inv_freq: bool | None = None) -> Path:
    """Write a random Phi-3-small checkpoint folder at `path` and return it.

    dtype "bf16" (as shipped) or "f32"; `shards` safetensors files with an index (1 = a single
    model.safetensors, no index). tie=True is Microsoft's layout (no lm_head.weight); tie=False is only
    for negative tests and writes an extra `lm_head.weight` (with `tie_word_embeddings: false`).
    inv_freq (default: on for the 8k layout) adds `model.layers.{i}.self_attn.rotary_emb.inv_freq`.
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in ("bf16", "f32"):
        raise ValueError(f"dtype must be 'bf16' or 'f32', not {dtype!r}")
    cfg = phi3small_config(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, ff=ff, vocab=vocab,
                           block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride,
                           homo_head=homo_head, dense_every_n=dense_every_n, max_pos=max_pos, longrope=longrope,
                           original_max=original_max, rope_base=rope_base,
                           rope_position_scale=rope_position_scale,
                           mup_embedding_multiplier=mup_embedding_multiplier,
                           mup_width_multiplier=mup_width_multiplier, mup_attn_multiplier=mup_attn_multiplier,
                           mup_use_scaling=mup_use_scaling, gegelu_limit=gegelu_limit, mscales=mscales,
                           rope_type=rope_type, dtype=dtype, seed=seed)
    if inv_freq is None:
        inv_freq = longrope is None
    weights = _weights(cfg, seed, inv_freq)
    if not tie:
        cfg["tie_word_embeddings"] = False
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"][::-1].copy()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    tensors = {k: torch.from_numpy(a).to(torch_dtype).contiguous() for k, a in weights.items()}

    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    # Split in HF module order into `shards` runs of roughly equal tensor count.
    bounds = np.linspace(0, len(names), shards + 1).round().astype(int)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[bounds[k]:bounds[k + 1]]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
