"""GGUF -> ONNX folder for ONNX Runtime (Mobile) and onnxruntime-genai, holding the same weights.

    export_onnx("model.q4_0.gguf", "model-onnx/")   # model.onnx, model.onnx.data,
                                                    # genai_config.json, tokenizer files

Every weight keeps its GGUF integer codes and scales: each quantized linear layer becomes a
`MatMulNBits` whose dequantized weights equal the GGUF's dequantized weights bit for bit (mapping
per block type in `onnx_weights`); a tensor that cannot be carried exactly is refused with a
message naming it. `onnx_decoder` composes the graph from the model description (Phi-3 and
Phi-3-small alike) out of `onnx_graph`'s blocks.

Policies (documented because peers differ):
- LongRoPE: two cos/sin caches, short factors ([original context, head_dim/2]) and long factors
  ([context, head_dim/2]); an `If` on the attention mask width picks long once the total sequence
  passes the original context. That is onnxruntime-genai's builder layout
  (`make_rotary_embedding_multi_cache`) and the rule of transformers and pocketlm's reference
  (factors chosen from the current total length; keys already in the cache keep their rotation).
  The caches are computed with `pocketlm.layers.rope_cos_sin`, so they hold the reference's
  float32 values.
- Sliding window: a query attends to the last `sliding_window` positions including itself (the
  reference and transformers); GroupQueryAttention's `local_window_size` = sliding_window gives
  exactly that (checked against the reference in tests/test_onnx_export.py).
- Phi-3-small's block-sparse layers are `com.microsoft.SparseAttention` (CSR layouts from
  pocketlm.blocksparse.csr_layouts over the whole context), its dense layers GroupQueryAttention.
  SparseAttention's CPU kernel needs past and present KV to be one buffer: a plain
  `InferenceSession.run` fails ("max_cache_sequence_length should be no less than
  total_sequence_length" with an empty past, "past_key->DataRaw() == present_key->DataRaw()" with
  separate arrays); io_binding one buffer as both works (`onnx_runner.CachedSession`), and so does
  onnxruntime-genai (0.18 checked) with genai_config's past_present_share_buffer = true, which the
  export writes (with it false genai fails as the plain run does). Model type "phi3small".
- accuracy_level (MatMulNBits activations): default "auto": the export is built at level 4 (int8
  activations, ~3x faster decoding on this x86 CPU, the arithmetic llama.cpp's own Q4_0/Q4_K dot
  products use; 8-bit layers whole), then a probe text runs at level 1 (float32 activations, the
  GGUF's model to float32 rounding), at level 4 and at level 1 with one more rounding's worth of
  noise on the weights; level 4 stays when its KL from level 1 is under 10 % of that noise's
  (`onnx_accuracy`: the threshold and the measurements behind it) and confident top-1 tokens stay,
  else the folder is rebuilt at level 1 -- models with activation outliers (onnxruntime issue 29849,
  Phi-3.5-mini). The export prints what it chose and why. `--accuracy-level 1` or `4` forces a level.
  8-bit weights (Q8_0, Q6_K) are written as two exact 4-bit halves at levels 0/1, because
  onnxruntime has no float32 kernel for 8-bit MatMulNBits (~20x slower), and whole at level 4.
- Size: MatMulNBits scales must have the activations' type (float32), so each block costs 2 bytes
  more than GGUF's fp16 scale (Q4_0: 5.0 instead of 4.5 bits per weight; Q4_K adds float32
  block minimums, Q6_K split in halves 12.25 bits at level 1, 10 at level 4).
- Speed against onnxruntime-genai's model builder (issue 14, `benchmarks/onnx_profile.py`): a Q4_0
  layer is the builder's node exactly (4 bits, block 32, float32 scales, no zero points, level 4),
  and so are fused QKV, GroupQueryAttention (packed QKV, rotary inside) and the Skip-RMSNorm
  chain. Q6_K (llama.cpp's output layer of a Q4_0 file) is exact only as 8 bits, block 16 (its
  scales are per 16 values); onnxruntime 1.32 runs it at ~1.7x the builder's 4-bit output layer per
  token, and no exact layout is faster (8 bits with explicit zero points, or two 4-bit halves, are
  not). That layer is the whole decode gap of a Q4_0 file's default export; a pure Q4_0 file
  measures at the builder's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pocketlm.config import Phi3Config, tensor_specs
from pocketlm.errors import PocketLMError
from pocketlm.quantize.formats import GGMLType

from .genai_config import make_genai_config, write_genai_config
from .gguf_format import type_name
from .gguf_reader import GGUFReader, TensorInfo
from .onnx_decoder import build_decoder, check_exportable, decoder_io, needs_shared_kv_buffer
from .onnx_graph import ExternalData, GraphBuilder, write_model
from .onnx_info import GENAI_CONFIG, MODEL_FILE, describe_onnx, is_onnx_folder  # noqa: F401
from .onnx_weights import (
    FLOAT_TYPES,
    MATMUL_NBITS_TYPES,
    NBitsWeight,
    convert_embedding,
    convert_linear,
)

DATA_FILE = "model.onnx.data"
# Files an export writes; an existing folder holding only these (or nothing) may be replaced.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = (MODEL_FILE, DATA_FILE, GENAI_CONFIG, *TOKENIZER_FILES)

ACCURACY_LEVELS = (0, 1, 4)
AUTO = "auto"
DEFAULT_ACCURACY_LEVEL = AUTO
PROBE_TOKENS = 128  # tokens of the probe text the "auto" check runs (level 1 vs 4)
ACCURACY_REASONS = {
    0: "accuracy_level 0 (unset: ONNX Runtime computes with float32 activations on CPU)",
    1: "accuracy_level 1 (float32 activations): the exported model computes what the GGUF "
       "defines, to float32 rounding",
    4: "accuracy_level 4 (int8 activations per block, as llama.cpp's Q4_0/Q4_K dot products): ~3x "
       "faster decoding on CPU",
}


def choose_accuracy_level(requested: int | str | None) -> tuple[int, str]:
    """-> (level to build with, why). None means the default, "auto": build with 4 and go back to 1
    unless the probe's measured cost is acceptable (`onnx_accuracy.LevelCost.acceptable`); the reason is
    then exactly "auto" and `_auto_accuracy_level` writes the real one (the build starts at 4)."""
    if requested is None:
        requested = DEFAULT_ACCURACY_LEVEL
    if requested == AUTO:  # built at 4 (8-bit layers whole); rebuilt at 1 if the probe refuses 4
        return 4, AUTO
    if requested not in ACCURACY_LEVELS:
        raise PocketLMError(f"accuracy level must be one of {ACCURACY_LEVELS} or {AUTO!r}, got {requested!r}")
    return requested, f"{ACCURACY_REASONS[requested]} (requested)"


@dataclass
class ExportSummary:
    path: Path
    accuracy_level: int
    accuracy_reason: str
    tensor_types: Counter = field(default_factory=Counter)  # GGUF type name -> tensors exported
    model_bytes: int = 0                                    # model.onnx + model.onnx.data
    seconds: float = 0.0
    note: str = ""                                          # how to run it, where that differs

    def __str__(self) -> str:
        types = ", ".join(f"{t} x{n}" for t, n in sorted(self.tensor_types.items()))
        note = f"\n  {self.note}" if self.note else ""
        return (f"wrote {self.path} ({self.model_bytes / 1e6:.1f} MB of model in {self.seconds:.1f} s)\n"
                f"  GGUF tensor types: {types}\n  {self.accuracy_reason}{note}")


SHARED_KV_NOTE = ("block-sparse layers are SparseAttention, whose CPU kernel needs past and present KV in "
                  "one buffer: onnxruntime-genai runs the folder as written (past_present_share_buffer); "
                  "under plain onnxruntime bind one buffer as past_key_values.N.* and present.N.* with "
                  "io_binding (pocketlm.export.onnx_runner.CachedSession), a plain session.run fails")


# ---------------------------------------------------------------------------- reading the GGUF

class _Source:
    """A GGUF opened for export: config, tokenizer fields, and tensor bytes read with pread (not
    the reader's map, so the pages of a multi-GB file do not pile up in this process)."""

    def __init__(self, path: str):
        self.path = path
        self.reader = GGUFReader(path)
        self.fd = -1
        try:
            md = self.reader.metadata
            factors = {n: self.reader.tensor(n).astype(np.float32) for n in
                       ("rope_factors_long.weight", "rope_factors_short.weight") if n in self.reader.tensors}
            self.cfg = Phi3Config.from_gguf_metadata(md, factors, source=path)
            self._check_tensors()
            self.fd = os.open(path, os.O_RDONLY)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.reader.close()

    def _check_tensors(self) -> None:
        for spec in tensor_specs(self.cfg):
            if spec.kind == "rope_factors":
                continue
            info = self.reader.tensors.get(spec.name)
            if info is None:
                if spec.name == "output.weight":  # llama.cpp falls back to the embedding (tied)
                    continue
                raise PocketLMError(f"GGUF file has no tensor {spec.name!r}", self.path)
            if info.shape != spec.shape:
                raise PocketLMError(f"tensor {spec.name!r} has shape {info.shape}, the config implies "
                                    f"{spec.shape}", self.path)

    def info(self, name: str) -> TensorInfo:
        return self.reader.info(name)

    def raw(self, name: str) -> np.ndarray:
        t = self.info(name)
        buf = bytearray(t.nbytes)
        view, done = memoryview(buf), 0
        while done < t.nbytes:
            n = os.preadv(self.fd, [view[done:]], t.offset + done)
            if n <= 0:
                raise PocketLMError(f"cannot read tensor {name!r}: file ends early", self.path)
            done += n
        return np.frombuffer(buf, dtype=np.uint8)

    def gtype(self, name: str) -> int:
        """The tensor's ggml type id, if the exporter can carry it exactly."""
        t = self.info(name)
        known = (*MATMUL_NBITS_TYPES, *FLOAT_TYPES, GGMLType.BF16)
        if t.type_id not in known:
            supported = ", ".join(type_name(x) for x in known)
            raise PocketLMError(f"tensor {name!r} has type {t.type_name}, which the ONNX exporter cannot "
                                f"convert losslessly (supported: {supported})", self.path)
        return t.type_id

    def floats(self, name: str) -> np.ndarray:
        """A float tensor (norm weights): F32 as is, F16/BF16 widened exactly."""
        if self.gtype(name) in MATMUL_NBITS_TYPES:
            raise PocketLMError(f"tensor {name!r} is {self.info(name).type_name}; norm weights must be "
                                f"F32, F16 or BF16", self.path)
        return np.ascontiguousarray(self.reader.dequantize(name), dtype=np.float32)

    def linear(self, name: str) -> NBitsWeight | np.ndarray:
        """MatMulNBits initializers, or W.T [K, N] (F32, or F16 kept as F16) for float tensors."""
        gtype, t = self.gtype(name), self.info(name)
        if gtype in MATMUL_NBITS_TYPES:
            return convert_linear(self.raw(name).reshape(t.shape[0], -1), gtype, t.shape, name, self.path)
        if gtype == GGMLType.F16:
            return np.ascontiguousarray(self.raw(name).view("<f2").reshape(t.shape).T)
        return np.ascontiguousarray(self.reader.dequantize(name).T)

    def embedding(self, name: str):
        """GatherBlockQuantized initializers where exact, else the table as F16 or F32."""
        gtype, t = self.gtype(name), self.info(name)
        if gtype in MATMUL_NBITS_TYPES:
            return convert_embedding(self.raw(name).reshape(t.shape[0], -1), gtype, t.shape, name, self.path)
        if gtype == GGMLType.F16:
            return self.raw(name).view("<f2").reshape(t.shape)
        return np.ascontiguousarray(self.reader.dequantize(name), dtype=np.float32)


# ---------------------------------------------------------------------------- export

def export_onnx(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                accuracy_level: int | str | None = None, progress: bool = True) -> ExportSummary:
    """Convert a GGUF (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32 tensors) into
    an ONNX folder; see the module docstring. `accuracy_level`: None (default "auto"), 0, 1, 4 or
    "auto" (`choose_accuracy_level`). The folder appears atomically (built beside it, then renamed)."""
    start = time.time()
    gguf_path, out = os.fspath(gguf_path), Path(out_dir)
    level, reason = choose_accuracy_level(accuracy_level)
    _check_target(out)
    src = _Source(gguf_path)
    try:
        check_exportable(src.cfg, gguf_path)
        return _export(src, out, level, reason, progress, start)
    finally:
        src.close()


def _export(src: _Source, out: Path, level: int, reason: str, progress: bool, start: float) -> ExportSummary:
    from pocketlm.tokenizer import tokenizer_from_gguf_fields

    gguf_path = src.path
    tok = tokenizer_from_gguf_fields(src.reader.tokenizer_fields(), source=gguf_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise PocketLMError(f"cannot create the ONNX folder: {e.strerror or e}", out) from None
    try:
        if progress:
            print(f"exporting {gguf_path} -> {out} ({reason})", file=sys.stderr)
        with open(tmp / DATA_FILE, "wb") as data_file:
            g = GraphBuilder(ExternalData(data_file, DATA_FILE), level)
            used = build_decoder(g, src, progress)
            data_file.flush()
            os.fsync(data_file.fileno())
        inputs, outputs = decoder_io(src.cfg)
        meta = {"pocketlm.source": os.path.basename(gguf_path), "pocketlm.accuracy_level": str(level),
                "pocketlm.tensor_types": json.dumps(dict(sorted(used.items()))),
                "pocketlm.tied_output": str(int("output.weight" not in src.reader.tensors))}
        doc = f"{src.cfg.architecture} decoder exported by pocketlm from GGUF"
        write_model(g.model(inputs, outputs, doc, meta),
                    tmp / MODEL_FILE)
        cfg = src.cfg
        write_genai_config(tmp, make_genai_config(cfg, filename=MODEL_FILE, bos_id=tok.bos_id,
                                                  eos_ids=tok.stop_ids, pad_id=cfg.pad_token_id))
        tok.write_hf_files(tmp)
        if reason == AUTO:
            level, reason = _auto_accuracy_level(tmp, tok, cfg, progress)
            eight = any(n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 8 for a in n.attribute)
                        for n in g.nodes)
            if level == 1 and eight:  # level 1 writes 8-bit layers as 4-bit halves: rebuild
                shutil.rmtree(tmp, ignore_errors=True)
                if progress:
                    print("  rebuilding at accuracy_level 1 (8-bit layers as two exact 4-bit halves)",
                          file=sys.stderr)
                return _export(src, out, 1, reason, progress, start)
        os.chmod(tmp, 0o777 & ~_umask())
        _replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PocketLMError(f"cannot write the ONNX folder: {e.strerror or e}", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = ExportSummary(out, level, reason, used,
                            (out / MODEL_FILE).stat().st_size + (out / DATA_FILE).stat().st_size,
                            time.time() - start, SHARED_KV_NOTE if needs_shared_kv_buffer(src.cfg) else "")
    if progress:
        print(summary, file=sys.stderr)
    return summary


def _auto_accuracy_level(folder: Path, tok, cfg: Phi3Config, progress: bool) -> tuple[int, str]:
    """Measure level 4's cost on the probe text in the folder (built at level 4); keep 4 if
    acceptable, else switch the attributes to 1 (the caller rebuilds if 8-bit layers need splitting)."""
    from .onnx_accuracy import PROBE_TEXT, int8_activation_cost, set_accuracy_level

    tokens = tok.encode(PROBE_TEXT)[: min(PROBE_TOKENS, cfg.max_position_embeddings)]
    if progress:
        print(f"  auto accuracy level: measuring int8 activations on {len(tokens)} probe tokens ...",
              file=sys.stderr)
    cost = int8_activation_cost(folder, MODEL_FILE, tokens)
    if cost.acceptable:
        return 4, f"{ACCURACY_REASONS[4]} (auto: check passed, {cost})"
    set_accuracy_level(folder / MODEL_FILE, 1)
    return 1, f"{ACCURACY_REASONS[1]} (auto: level 4 refused, {cost})"


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PocketLMError("exists and is not a folder", out)
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in EXPORT_FILES]
        if foreign:
            raise PocketLMError(f"folder exists and holds files an ONNX export does not write "
                                f"({', '.join(sorted(foreign)[:3])}); choose an empty or new folder", out)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an older export there is swapped out, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.replace(out, old / "export")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------- CLI

def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """`--onnx OUT_DIR` and `--accuracy-level` for `pocketlm export MODEL.gguf`."""
    parser.add_argument("--onnx", metavar="OUT_DIR",
                        help="convert a GGUF (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K/F16/F32) into an ONNX folder for "
                             "ONNX Runtime and onnxruntime-genai, with the same weights")
    parser.add_argument("--accuracy-level", choices=[*map(str, ACCURACY_LEVELS), AUTO], default=None,
                        help="MatMulNBits activations: auto (default) = 4 if on a probe text int8 "
                             "activations cost under 10%% of the KL one more weight rounding costs, and keep "
                             "confident top-1 tokens (pocketlm.export.onnx_accuracy), else 1; 1 = float32 "
                             "(exact); 4 = int8 (~3x faster "
                             "decoding; can change top tokens on models with activation outliers, "
                             "onnxruntime issue 29849); 0 = unset")


def run_onnx_export(args: argparse.Namespace) -> int:
    """Handler for `pocketlm export MODEL.gguf --onnx OUT_DIR`."""
    level = args.accuracy_level
    level = None if level is None or level == AUTO else int(level)
    summary = export_onnx(args.source, args.onnx, accuracy_level=level, progress=True)
    print(describe_onnx(summary.path))
    print(f"chose {summary.accuracy_reason}")
    if summary.note:
        print(f"note: {summary.note}")
    return 0
