"""MatMulNBits `accuracy_level`: float32 or int8 activations, and the check behind "auto".

Level 4 quantizes each activation block to int8 before the dot products: faster on CPU (VNNI on
x86, sdot/i8mm on ARM), but on models with outlier activation channels it changes the top token
(onnxruntime issue 29849: Phi-3.5-mini). `int8_activation_check` runs a probe text through the
exported model at level 1 and at level 4 and passes only if every position keeps its top-1 token.
The probe runs through `onnx_runner.CachedSession` (KV buffers shared between past and present),
so it works for Phi-3-small's SparseAttention layers as for GroupQueryAttention.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .onnx_runner import CachedSession

# A generic English probe: the check is about activation outliers, which any text exercises.
PROBE_TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long "
              "discussion about roads, schools and the new library, the members agreed to publish "
              "their report in March, and the mayor thanked everyone for their patience.")


def set_accuracy_level(model_path: str | os.PathLike, level: int,
                       out_path: str | os.PathLike | None = None) -> None:
    """Rewrite every MatMulNBits' accuracy_level in a model.onnx (its weights stay in the data file)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    for entry in model.metadata_props:
        if entry.key == "pocketlm.accuracy_level":
            entry.value = str(level)
    out = Path(out_path or model_path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out)


def prompt_logits(folder: str | os.PathLike, model_file: str, tokens: list[int], level: int) -> np.ndarray:
    """Logits [T, V] of `tokens` as one prompt, with the folder's model at `level`."""
    import onnxruntime as ort

    folder = Path(folder)
    variant = folder / f".level{level}.{model_file}"  # beside the data file it references
    set_accuracy_level(folder / model_file, level, variant)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(variant), opts, providers=["CPUExecutionProvider"])
        # past and present bound to one buffer: SparseAttention (Phi-3-small) runs only that way
        return CachedSession(sess, max_cache=len(tokens))(tokens)
    finally:
        variant.unlink(missing_ok=True)


def int8_activation_check(folder: str | os.PathLike, model_file: str, tokens: list[int]) -> tuple[bool, str]:
    """-> (level 4 keeps every top-1 token of level 1 on `tokens`, a one-line account)."""
    exact = prompt_logits(folder, model_file, tokens, 1)
    fast = prompt_logits(folder, model_file, tokens, 4)
    flips = int(np.count_nonzero(exact.argmax(-1) != fast.argmax(-1)))
    rel = float(np.abs(fast - exact).max() / max(float(np.abs(exact).max()), 1e-30))
    detail = (f"int8 activations on a {len(tokens)}-token probe: {flips} top-1 changes, "
              f"max logit difference {rel:.2e} of the largest logit")
    return flips == 0, detail
