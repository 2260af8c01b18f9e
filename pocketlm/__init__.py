"""pocketlm: take a Phi-3-family checkpoint to a phone.

The public API (`pocketlm.load_checkpoint`, `quantize_model`, `export_gguf`, `export_onnx`, `load`,
`generate`, `benchmark`) lives in `pocketlm.api` and loads on first use, so importing pocketlm is cheap.
"""

__version__ = "0.1.0"

_API = ("load_checkpoint", "quantize_model", "export_gguf", "export_onnx", "load", "generate", "benchmark")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
