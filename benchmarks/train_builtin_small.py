"""The Phi-3-small arm of train_builtin_model.py: pocketlm's second built-in model.

    nice -n 10 python benchmarks/train_builtin_model.py --arch phi3small --out pocketlm/builtin_small \\
        [--minutes 25] [--seed S] [--resume]

Rebuilds everything in `--out` from the shared corpus (`pocketlm.corpus`, split by whole works):
1. a byte-level BPE of RANKS ranks trained on the `train` split with the cl100k pre-tokenizer
   (benchmarks/train_bpe.py), stored as a tiktoken rank file; pocketlm's TiktokenTokenizer lays
   Phi-3-small's 96 special tokens out after the ranks (vocabulary RANKS + 96 = 3072 ids);
2. a `Phi3SmallForCausalLM` (benchmarks/phi3small_training_model.py: LayerNorm with biases,
   GeGELU limit 20, muP multipliers, GQA 8 query / 2 KV heads, block-sparse attention with block
   16, 4 local blocks, vertical stride 4 in layers 0 and 2) trained with AdamW, bf16 autocast and
   a cosine schedule on random SEQ_LEN-token windows of the train stream (each work opens with
   <|endoftext|>), the step count sized from the tokens/s measured in the first minute to fit
   `--minutes`;
3. the folder written as Microsoft ships Phi-3-small (config.json with its field names,
   head-major query_key_value and interleaved up_proj rows, biases, no lm_head, bf16
   safetensors, the rank file, tokenizer_config.json with the chat template), then the held-out
   perplexity of those shipped weights computed by pocketlm's own numpy reference
   (`pocketlm.reference`, read through `pocketlm.checkpoint`) next to a unigram baseline, and
   greedy samples, written to training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from phi3small_training_model import Phi3SmallLM, SmallShape, config_json
from safetensors.torch import save_file
from train_bpe import piece_counts, train_bpe, write_rank_file

REPO = Path(__file__).resolve().parents[1]
from pocketlm import corpus  # noqa: E402
from pocketlm.tokenizer_tiktoken import PHI3_SMALL_CHAT_TEMPLATE, TiktokenTokenizer  # noqa: E402

RANKS = 2976            # + 96 special ids = 3072 = 48 * 64: no padding ids needed
SEQ_LEN = 512           # training windows: 32 blocks of 16, so the sparse layers see their pattern
RANK_FILE = "shakespeare_bpe.tiktoken"
PROMPTS = ("ROMEO.\nO gentle", "KING.\nNow, my lords,")
DEFAULT_WORK = Path("/tmp/pocketlm_builtin_small_work")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def encode_works(tok: TiktokenTokenizer, texts: list[str]) -> np.ndarray:
    """One token stream (int32): each work as <|endoftext|> + its tokens."""
    ids: list[int] = []
    for text in texts:
        ids.append(tok.bos_id)
        ids.extend(tok.encode(text, parse_special=False))
    return np.asarray(ids, dtype=np.int32)


def tokenizer_config() -> dict:
    """tokenizer_config.json as microsoft/Phi-3-small-8k-instruct ships it (the tokenizer is
    tiktoken; the file carries the special tokens' names and the chat template)."""
    return {
        "added_tokens_decoder": {},
        "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer",
                                       "tokenization_phi3_small.Phi3SmallTokenizer"]},
        "bos_token": "<|endoftext|>", "chat_template": PHI3_SMALL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": "<|endoftext|>", "model_max_length": 4096,
        "pad_token": "<|endoftext|>", "tokenizer_class": "Phi3SmallTokenizer",
    }


# -------------------------------------------------------------------------------------- evaluation

def eval_windows(ids: np.ndarray, seq_len: int = SEQ_LEN) -> np.ndarray:
    """Non-overlapping windows [n, seq_len] of the stream; within each, tokens 1.. are predicted."""
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def reference_nll(folder: Path, windows: np.ndarray) -> tuple[float, int]:
    """Summed NLL (nats) and count of tokens 1.. of each window under pocketlm's numpy reference
    forward of the checkpoint folder (its shipped bf16 weights, computed in float32)."""
    from pocketlm.checkpoint import Checkpoint
    from pocketlm.reference import Phi3Reference

    model = Phi3Reference.from_checkpoint(Checkpoint.open(folder))
    total, count = 0.0, 0
    for w in windows:
        logits = model.forward(w)[:-1].astype(np.float64)                  # [L-1, V]
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return total, count


def unigram_nll(train_ids: np.ndarray, windows: np.ndarray, vocab: int) -> float:
    """Mean NLL of a unigram model (train-split counts, add-one smoothing) on the same targets."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[windows[:, 1:]].mean())


def greedy_samples(folder: Path, n: int = 60) -> dict:
    """Greedy continuations by pocketlm's reference forward (through its KV cache)."""
    from pocketlm.checkpoint import Checkpoint
    from pocketlm.reference import Phi3Reference

    tok = TiktokenTokenizer.from_hf_dir(folder)
    model = Phi3Reference.from_checkpoint(Checkpoint.open(folder))
    out = {}
    for prompt in PROMPTS:
        cache = model.new_cache()
        ids = [tok.bos_id, *tok.encode(prompt)]
        logits = model.forward(ids, cache)[-1]
        new: list[int] = []
        for _ in range(n):
            t = int(np.argmax(logits))
            if t in tok.stop_ids:
                break
            new.append(t)
            logits = model.forward([t], cache)[-1]
        out[prompt] = tok.decode(new)
    return out


# ------------------------------------------------------------------------------------------ output

def write_folder(stage: Path, model: Phi3SmallLM, tok: TiktokenTokenizer, rank_file: Path) -> None:
    """The checkpoint folder as Microsoft ships Phi-3-small (see the module docstring)."""
    stage.mkdir(parents=True)
    cfg = config_json(model.shape, tok.bos_id, tok.end_id, tok.dummy_token_ids)
    (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": [tok.eot_id, tok.end_id],
           "transformers_version": "4.38.1"}
    (stage / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    save_file(model.hf_state_dict(torch.bfloat16), str(stage / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(rank_file, stage / RANK_FILE)
    (stage / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n",
                                                 encoding="utf-8")


def save_state(path: Path, model, opt, step: int, total: int, gen: np.random.Generator, elapsed: float,
               cuts: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                "rng": gen.bit_generator.state, "elapsed": elapsed, "cuts": cuts}, tmp)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = DEFAULT_WORK if args.work == Path("/tmp/pocketlm_builtin_work") else args.work
    work.mkdir(parents=True, exist_ok=True)
    shared = Path(args.shared_dir) if args.shared_dir else corpus.default_shared_dir()
    texts = {s: [corpus.read_work(p) for p in corpus.corpus_files(s, shared)] for s in corpus.SPLITS}
    works = {s: [p.stem for p in corpus.corpus_files(s, shared)] for s in corpus.SPLITS}

    rank_file = work / RANK_FILE
    write_rank_file(train_bpe(piece_counts(texts["train"]), RANKS), rank_file)
    tok = TiktokenTokenizer.from_rank_file(rank_file)
    ids = {s: encode_works(tok, texts[s]) for s in corpus.SPLITS}
    log(f"tokenizer: {tok.n_ranks} ranks, vocabulary {tok.vocab_size}; tokens: "
        + ", ".join(f"{s} {len(v)}" for s, v in ids.items()))

    shape = SmallShape(vocab=tok.vocab_size)
    model = Phi3SmallLM(shape, tok.dummy_token_ids)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed_tokens" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = np.random.default_rng(args.seed)
    state_path = work / "state.pt"
    step, total, elapsed = 0, args.steps, 0.0
    cuts: list[list[int]] = []  # [step, new total] each time the step count was re-planned
    if args.resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.bit_generator.state = st["rng"]
        step, total, elapsed = st["step"], args.steps or st["total"], st["elapsed"]
        cuts = st.get("cuts", [])
        log(f"resumed at step {step}/{total}")

    warmup, train = 100, ids["train"]
    model.train()
    t_start = time.time() - elapsed
    t_probe = last_save = t_mark = time.time()
    sec_per_step = 0.0  # moving average of the recent seconds per step
    probe_from = step + 3  # the first steps warm up allocators; time from here
    while total == 0 or step < total:
        starts = gen.integers(0, len(train) - SEQ_LEN - 1, size=args.batch)
        batch = torch.from_numpy(np.stack([train[s:s + SEQ_LEN + 1] for s in starts]).astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, args.lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])                                      # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, shape.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step == probe_from:
            t_probe = time.time()
        if total == 0 and step > probe_from + 10 and time.time() - t_probe > 60:
            per_step = (time.time() - t_probe) / (step - probe_from)
            left = args.minutes * 60 - (time.time() - t_start)
            total = step + max(1, int(left / per_step))
            log(f"probe: {per_step:.2f} s/step, {args.batch * SEQ_LEN / per_step:.0f} tokens/s -> {total} steps")
        if total and args.steps == 0 and step % 25 == 0:
            # The machine is shared: re-plan to the recent speed, shrinking only (the schedule's
            # tail is what moves, so a cut mid-run keeps a clean cosine to the new end).
            recent = (time.time() - t_mark) / 25
            sec_per_step = recent if sec_per_step == 0 else 0.7 * sec_per_step + 0.3 * recent
            fit = step + 1 + int(max(0.0, args.minutes * 60 - (time.time() - t_start)) / sec_per_step)
            if fit < total - 10:
                total = max(step + 1, fit)
                cuts.append([step, total])
                log(f"{sec_per_step:.2f} s/step: step count re-planned to {total}")
        if step % 25 == 0:
            t_mark = time.time()
            el = time.time() - t_start
            log(f"step {step}/{total} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{step * args.batch * SEQ_LEN / el:.0f} tok/s {el / 60:.1f} min")
        if time.time() - last_save > 180:
            save_state(state_path, model, opt, step, total, gen, time.time() - t_start, cuts)
            last_save = time.time()
    train_seconds = time.time() - t_start
    save_state(state_path, model, opt, step, total, gen, train_seconds, cuts)

    out = args.out.resolve()
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    write_folder(stage, model.eval(), tok, rank_file)
    windows = eval_windows(ids["heldout"])
    t_eval = time.time()
    nll, count = reference_nll(stage, windows)
    log(f"reference evaluation of {count} tokens: {time.time() - t_eval:.0f} s")
    record = {
        "model": "Phi3SmallForCausalLM", "parameters": n_params, "dtype": "bfloat16", "seed": args.seed,
        "steps": step, "batch_windows": args.batch, "seq_len": SEQ_LEN,
        "tokens_seen": step * args.batch * SEQ_LEN, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(step * args.batch * SEQ_LEN / train_seconds, 1),
        "step_count_replans": cuts,
        "optimizer": {"name": "AdamW", "peak_lr": args.lr, "betas": [0.9, 0.95],
                      "weight_decay": "0.1 on linear weights (not the embedding, biases, norms)",
                      "warmup_steps": warmup, "schedule": "cosine to 10% of peak", "grad_clip": 1.0,
                      "precision": "float32 weights, bfloat16 autocast"},
        "split": works, "split_tokens": {s: len(v) for s, v in ids.items()},
        "tokenizer": {"type": "byte-level BPE, cl100k pre-tokenizer (benchmarks/train_bpe.py), "
                              "tiktoken rank file, Phi-3-small special tokens after the ranks",
                      "ranks": tok.n_ranks, "vocab_size": tok.vocab_size},
        "heldout": {"evaluation": f"pocketlm.reference (numpy float32) on the shipped bf16 weights; "
                                  f"non-overlapping {SEQ_LEN}-token windows of the heldout stream (each "
                                  f"work opens with <|endoftext|>), tokens 1.. of each window predicted",
                    "tokens": count, "perplexity": round(math.exp(nll / count), 3),
                    "unigram_perplexity": round(math.exp(unigram_nll(train, windows, tok.vocab_size)), 3)},
        "samples_greedy": greedy_samples(stage),
        "versions": {"torch": torch.__version__},
        "command": "python benchmarks/train_builtin_model.py --arch phi3small --out pocketlm/builtin_small "
                   f"--seed {args.seed} --steps {step} --batch {args.batch} --lr {args.lr}",
    }
    (stage / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(json.dumps(record["heldout"]))
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log(f"wrote {out}: {sizes}, total {sum(sizes.values())} bytes")
    for prompt, text in record["samples_greedy"].items():
        log(f"sample {prompt!r}: {text!r}")
