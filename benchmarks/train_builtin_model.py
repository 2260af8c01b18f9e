"""Train pocketlm's built-in model: a small, real Phi-3-architecture model on the Shakespeare corpus.

    nice -n 5 python benchmarks/train_builtin_model.py --out pocketlm/builtin [--minutes N] [--seed S]
    nice -n 10 python benchmarks/train_builtin_model.py --arch phi3small --out pocketlm/builtin_small

`--arch phi3small` trains the second built-in model, of the Phi-3-small architecture (a tiktoken
byte-level BPE, block-sparse attention, muP): benchmarks/train_builtin_small.py. The rest of this
docstring is about the first one (`--arch phi3`, the default).

Rebuilds everything in `--out` from the shared corpus (`pocketlm.corpus`, split by whole works):
1. a SentencePiece BPE tokenizer trained on the `train` split with Llama-2/Phi-3 settings (byte
   fallback, split digits, dummy prefix, no normalisation), the Phi-3 chat tokens appended after
   its pieces as added tokens (as Phi-3 appends them after its 32000 pieces), converted to a
   Hugging Face `tokenizer.json` with transformers' slow->fast converter;
2. a `Phi3ForCausalLM` (GQA, every linear input dimension a multiple of 256 for Q4_K/Q6_K
   super-blocks) trained with AdamW and a cosine schedule on random 256-token windows, the step
   count sized from the tokens/s measured in the first minute to fit `--minutes`;
3. the held-out perplexity of the shipped (fp16) weights next to a unigram baseline, and sample
   continuations, written to `training.json`.

Checkpoints go to `--work` (outside the repository) every few minutes; `--resume` picks up from
the last one, so a stop is never fatal.
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
import sentencepiece as spm
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import SentencePieceExtractor

REPO = Path(__file__).resolve().parents[1]
from pocketlm import corpus  # noqa: E402

# Phi-3's added tokens (ids 32000..32010 in Phi-3; here they follow our SentencePiece pieces in
# the same order). rstrip as in Phi-3's tokenizer.json and llama.cpp's phi3 rule: every control
# token eats the whitespace after it except <unk>, <s> and <|endoftext|>.
PHI3_ADDED_TOKENS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)
NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")
VOCAB_SIZE = 2048
SPM_PIECES = VOCAB_SIZE - len(PHI3_ADDED_TOKENS)  # 2037 incl. <unk> <s> </s> and 256 byte pieces
CHAT_TEMPLATE = "data/phi3/microsoft-Phi-3.5-mini-instruct.jinja"

SEQ_LEN = 256
EVAL_SLICE_TOKENS = 4096  # the short held-out slice that tests/test_builtin_model.py recomputes
PROMPTS = ("ROMEO.\nO gentle", "KING.\nNow, my lords,")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- tokenizer

def train_sentencepiece(train_text: str, prefix: Path) -> Path:
    """SentencePiece BPE on the train split's lines, with the Llama-2 trainer settings."""
    lines = [line for line in train_text.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe",
        vocab_size=SPM_PIECES, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_unicode_script=True, split_by_whitespace=True,
        max_sentencepiece_length=16, character_coverage=1.0,  # Llama: 0.99995; a tiny alphabet here
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


def fast_tokenizer(spm_model: Path) -> Tokenizer:
    """tokenizer.json laid out like Phi-3's: Llama's legacy slow->fast conversion plus added tokens.

    transformers' own `LlamaConverter` is broken in transformers 5 (it passes the vocabulary where
    `SentencePieceExtractor.extract` now wants a model class), so this assembles the same pieces:
    the extractor's vocabulary and score-ordered merges, a BPE model with byte fallback, and the
    legacy normaliser (prepend "▁", spaces to "▁") and decoder that Phi-3's tokenizer.json has.
    """
    extracted = SentencePieceExtractor(str(spm_model)).extract(BPE)
    tok = Tokenizer(BPE(extracted["vocab"], extracted["merges"], unk_token="<unk>", fuse_unk=True,
                        byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    # Phi-3's <unk>/<s>/</s> are special added tokens too; </s> has rstrip like the chat tokens.
    specials = [AddedToken(t, special=True, normalized=False, rstrip=t not in NO_RSTRIP)
                for t in ("<unk>", "<s>", "</s>", *PHI3_ADDED_TOKENS)]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    for i, t in enumerate(PHI3_ADDED_TOKENS):
        assert tok.token_to_id(t) == SPM_PIECES + i, t
    return tok


def tokenizer_config(chat_template: str) -> dict:
    """tokenizer_config.json with the fields Phi-3-mini-instruct ships."""
    added = {}
    for i, t in enumerate(("<unk>", "<s>", "</s>", *PHI3_ADDED_TOKENS)):
        tid = i if i < 3 else SPM_PIECES + i - 3
        added[str(tid)] = {"content": t, "lstrip": False, "normalized": False,
                           "rstrip": t not in NO_RSTRIP, "single_word": False, "special": True}
    return {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "chat_template": chat_template, "clean_up_tokenization_spaces": False,
        "legacy": False, "model_max_length": 4096, "padding_side": "left", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    }


def build_tokenizer(train_text: str, shared: Path, work: Path) -> tuple[Path, Tokenizer, dict]:
    spm_model = train_sentencepiece(train_text, work / "tokenizer")
    tok = fast_tokenizer(spm_model)
    chat_template = (shared / CHAT_TEMPLATE).read_text(encoding="utf-8")
    return spm_model, tok, tokenizer_config(chat_template)


def encode_works(sp: spm.SentencePieceProcessor, texts: list[str]) -> np.ndarray:
    """One token stream: each work as <s> + its pieces (int32 ids)."""
    ids: list[int] = []
    for text in texts:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(text))
    return np.asarray(ids, dtype=np.int32)


def check_fast_matches_spm(tok: Tokenizer, sp: spm.SentencePieceProcessor, texts: list[str]) -> None:
    """The shipped tokenizer.json must tokenize exactly as the SentencePiece model it came from."""
    for text in texts:
        for start in range(0, len(text), 20000):
            chunk = text[start:start + 20000]
            fast = tok.encode(chunk, add_special_tokens=False).ids
            if fast != sp.encode(chunk):
                raise SystemExit(f"tokenizer.json disagrees with sentencepiece near char {start}")


# ------------------------------------------------------------------------------------------- model

def model_config(tok: Tokenizer) -> transformers.Phi3Config:
    """phi-3-mini-4k shape, shrunk: every linear layer's input dim (256, 768) divides by 256."""
    eot = tok.token_to_id("<|endoftext|>")
    return transformers.Phi3Config(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
        max_position_embeddings=4096, original_max_position_embeddings=4096, rope_theta=10000.0,
        sliding_window=2047, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=eot, pad_token_id=eot,
        attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def random_batch(ids: np.ndarray, batch: int, gen: np.random.Generator) -> torch.Tensor:
    """[batch, SEQ_LEN + 1] windows at random offsets of the train stream."""
    starts = gen.integers(0, len(ids) - SEQ_LEN - 1, size=batch)
    return torch.from_numpy(np.stack([ids[s:s + SEQ_LEN + 1] for s in starts]).astype(np.int64))


def train_step(model, opt, batch: torch.Tensor) -> float:
    logits = model(input_ids=batch[:, :-1]).logits  # [B, T, vocab]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             batch[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def save_state(path: Path, model, opt, step: int, total: int, gen: np.random.Generator,
               elapsed: float, cuts: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                "rng": gen.bit_generator.state, "elapsed": elapsed, "cuts": cuts}, tmp)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- evaluation

def eval_windows(ids: np.ndarray) -> np.ndarray:
    """Non-overlapping SEQ_LEN windows [n, SEQ_LEN]; within each, tokens 1.. are predicted."""
    n = len(ids) // SEQ_LEN
    return ids[:n * SEQ_LEN].reshape(n, SEQ_LEN)


@torch.no_grad()
def model_nll(model, windows: np.ndarray, batch: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and count of the predicted tokens."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = torch.from_numpy(windows[i:i + batch].astype(np.int64))
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return total, count


def unigram_nll(train_ids: np.ndarray, windows: np.ndarray) -> float:
    """Mean NLL of a unigram model (train-split counts, add-one smoothing) on the same targets."""
    counts = np.bincount(train_ids, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:]].mean())


@torch.no_grad()
def samples(model, sp: spm.SentencePieceProcessor, seed: int) -> dict:
    out = {}
    for prompt in PROMPTS:
        x = torch.tensor([[sp.bos_id(), *sp.encode(prompt)]])
        greedy = model.generate(x, max_new_tokens=60, do_sample=False, repetition_penalty=1.0)
        torch.manual_seed(seed)
        sampled = model.generate(x, max_new_tokens=60, do_sample=True, temperature=0.7, top_k=40)
        out[prompt] = {"greedy": sp.decode(greedy[0, 1:].tolist()),
                       "temperature_0.7_top_k_40": sp.decode(sampled[0, 1:].tolist())}
    return out


# ------------------------------------------------------------------------------------------- main

def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def add_v4_config_spellings(path: Path) -> None:
    """Also spell the rope settings and dtype as transformers 4.x (and Microsoft's configs) did.

    transformers 5 writes `rope_parameters`/`dtype` only; tools written against the published
    Phi-3 configs (llama.cpp's converter, the ONNX Runtime GenAI builder) read `rope_theta`,
    `rope_scaling` and `torch_dtype`. transformers 5 loads a config holding both spellings.
    """
    cfg = json.loads(path.read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{path}: unexpected rope_parameters {rope}")
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg.setdefault("rope_scaling", None)
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float16"))
    write_atomic(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("phi3", "phi3small"), default="phi3",
                    help="phi3: pocketlm/builtin; phi3small: pocketlm/builtin_small (train_builtin_small.py)")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder (pocketlm/builtin)")
    ap.add_argument("--minutes", type=float, default=22.0, help="training wall-time budget")
    ap.add_argument("--steps", type=int, default=0, help="fixed step count (default: sized to --minutes)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=None,
                    help="windows per step (phi3: 16 of 256 tokens; phi3small: 8 of 512)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared-dir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/pocketlm_builtin_work"),
                    help="scratch folder for the periodic training checkpoint")
    ap.add_argument("--resume", action="store_true", help="continue from --work/state.pt")
    ap.add_argument("--replan", action="store_true",
                    help="with --resume: re-size the step count to the new --minutes, longer or shorter")
    args = ap.parse_args()
    if args.arch == "phi3small":
        from train_builtin_small import run

        args.batch = args.batch or 8
        return run(args)
    args.batch = args.batch or 16

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    shared = Path(args.shared_dir) if args.shared_dir else corpus.default_shared_dir()

    texts = {s: [corpus.read_work(p) for p in corpus.corpus_files(s, shared)] for s in corpus.SPLITS}
    works = {s: [p.stem for p in corpus.corpus_files(s, shared)] for s in corpus.SPLITS}
    spm_model, tok, tok_config = build_tokenizer("\n".join(texts["train"]), shared, args.work)
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    check_fast_matches_spm(tok, sp, texts["heldout"] + texts["calib"])
    ids = {s: encode_works(sp, texts[s]) for s in corpus.SPLITS}
    log("tokens: " + ", ".join(f"{s} {len(v)}" for s, v in ids.items()))

    cfg = model_config(tok)
    model = transformers.Phi3ForCausalLM(cfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = np.random.default_rng(args.seed)
    state_path = args.work / "state.pt"
    step, total, elapsed = 0, args.steps, 0.0
    cuts: list[list[int]] = []  # [step, new total] each time the step count was re-planned
    if args.resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.bit_generator.state = st["rng"]
        step, total, elapsed, cuts = st["step"], st["total"], st["elapsed"], st.get("cuts", [])
        total = args.steps or total
        log(f"resumed at step {step}/{total}")

    warmup = 100
    resize = args.steps == 0  # size (and later shrink) the step count to fit --minutes
    may_grow = args.replan  # a resumed run with a new --minutes may also lengthen the schedule
    probe_steps = 0  # steps timed to size `total`
    model.train()
    t_start = time.time() - elapsed
    t_probe = t_mark = last_save = time.time()
    sec_per_step = 0.0  # moving average, for shrinking `total` when the shared machine slows down
    while total == 0 or step < total:
        batch = random_batch(ids["train"], args.batch, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, args.lr, warmup)
        loss = train_step(model, opt, batch)
        step += 1
        if total == 0:
            probe_steps += 1
            if probe_steps == 3:  # the first steps warm up allocators; time from here
                t_probe = time.time()
            if time.time() - t_probe > 60 and probe_steps > 10:
                per_step = (time.time() - t_probe) / (probe_steps - 3)
                left = args.minutes * 60 - (time.time() - t_start)
                total = max(step + 1, step + int(left / per_step))
                log(f"probe: {per_step:.3f} s/step, {args.batch * SEQ_LEN / per_step:.0f} tokens/s "
                    f"-> {total} steps")
        if resize and total and step % 25 == 0:
            recent = (time.time() - t_mark) / 25
            t_mark = time.time()
            sec_per_step = recent if sec_per_step == 0 else 0.7 * sec_per_step + 0.3 * recent
            left = args.minutes * 60 - (time.time() - t_start)
            fit = step + 1 + int(max(0.0, left) / sec_per_step)
            if fit < total - 10 or may_grow:
                total = max(step + 1, fit)
                cuts.append([step, total])
                log(f"{sec_per_step:.2f} s/step: step count re-planned to {total}")
                may_grow = False
        if step % 50 == 0:
            el = time.time() - t_start
            log(f"step {step}/{total} loss {loss:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{step * args.batch * SEQ_LEN / el:.0f} tok/s {el / 60:.1f} min")
        if time.time() - last_save > 180:
            save_state(state_path, model, opt, step, total, gen, time.time() - t_start, cuts)
            last_save = time.time()
    train_seconds = time.time() - t_start
    save_state(state_path, model, opt, step, total, gen, train_seconds, cuts)

    # Evaluate the weights as shipped: fp16, read back as fp32.
    model = model.half().float().eval()
    windows = eval_windows(ids["heldout"])
    nll, count = model_nll(model, windows)
    slice_windows = eval_windows(ids["heldout"][:EVAL_SLICE_TOKENS])
    slice_nll, slice_count = model_nll(model, slice_windows)
    record = {
        "model": "Phi3ForCausalLM", "parameters": n_params, "dtype": "float16",
        "seed": args.seed, "steps": step, "batch_windows": args.batch, "seq_len": SEQ_LEN,
        "tokens_seen": step * args.batch * SEQ_LEN, "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(step * args.batch * SEQ_LEN / train_seconds, 1),
        "step_count_replans": cuts,
        "optimizer": {"name": "AdamW", "peak_lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1,
                      "warmup_steps": warmup, "schedule": "cosine to 10% of peak", "grad_clip": 1.0},
        "split": works, "split_tokens": {s: len(v) for s, v in ids.items()},
        "tokenizer": {"type": "sentencepiece BPE, byte_fallback, split_digits, add_dummy_prefix, "
                              "identity normalisation; Phi-3 chat tokens appended",
                      "spm_pieces": SPM_PIECES, "vocab_size": VOCAB_SIZE},
        "heldout": {"evaluation": f"non-overlapping {SEQ_LEN}-token windows of the heldout stream "
                                  "(each work starts with <s>); tokens 1.. of each window predicted",
                    "tokens": count, "perplexity": round(math.exp(nll / count), 3),
                    "unigram_perplexity": round(math.exp(unigram_nll(ids["train"], windows)), 3)},
        "heldout_slice": {"first_tokens": EVAL_SLICE_TOKENS, "tokens": slice_count,
                          "perplexity": round(math.exp(slice_nll / slice_count), 3),
                          "unigram_perplexity":
                              round(math.exp(unigram_nll(ids["train"], slice_windows)), 3)},
        "samples": samples(model, sp, args.seed),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentencepiece": spm.__version__},
        # With no cuts this repeats the run; after cuts (a busy machine) it gives the same data order
        # with a clean cosine schedule of the same length.
        "command": "python benchmarks/train_builtin_model.py --out pocketlm/builtin "
                   f"--seed {args.seed} --steps {step} --batch {args.batch} --lr {args.lr}",
    }
    log(json.dumps(record["heldout"]) + " " + json.dumps(record["heldout_slice"]))

    # Write the folder next to --out, then swap it in, so a failure leaves the old one intact.
    out = args.out.resolve()
    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    model.half().save_pretrained(stage, safe_serialization=True)
    add_v4_config_spellings(stage / "config.json")
    tok.save(str(stage / "tokenizer.json"))
    shutil.copyfile(spm_model, stage / "tokenizer.model")
    write_atomic(stage / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<unk>"}
    write_atomic(stage / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    write_atomic(stage / "training.json", json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log(f"wrote {out}: {sizes}, total {sum(sizes.values())} bytes")
    for prompt, s in record["samples"].items():
        log(f"sample {prompt!r}: {s}")


if __name__ == "__main__":
    main()
