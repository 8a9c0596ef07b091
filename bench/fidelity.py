"""Does 4-bit NF4 keep 16-bit quality? The QLoRA paper's central claim, on real text.

No model hub is reachable, so the benchmark makes its own pretrained model:

1. Corpus: the Python standard library's source (``bench/fidelity_data.py``),
   split into pretraining and held-out files by path hash; a byte-level BPE
   tokenizer is trained on the pretraining files.
2. Pretraining: a small Llama-architecture model, plain ``torch.optim.AdamW``
   (bf16 autocast with fp32 master weights on CUDA, fp32 on CPU), saved with
   ``save_pretrained`` and its tokenizer.
3. Zero-shot: held-out perplexity of that model dense (16-bit), NF4+DQ, NF4,
   FP4+DQ and INT4+DQ (every decoder linear quantized; the output head stays
   dense, as ``qlora.load_model`` does).
4. Fine-tuning on a different task (signature + docstring -> function body,
   alpaca jsonl read through ``qlora.train.data``): full fine-tuning, 16-bit
   LoRA and QLoRA with NF4+DQ, NF4, FP4+DQ, INT4+DQ; same rank, targets, steps,
   seed and data order; three learning rates each; the best held-out loss per
   method is reported.

INT4 (symmetric absmax, 15 levels) is not a type ``load_model`` offers; its
model is the 16-bit one with each linear swapped for a ``Linear4bit`` holding
INT4 codes from ``qlora.quant.fourbit._quantize``, so it is stored and
computed exactly like NF4 and FP4 and only the code book differs.

    PYTHONPATH=src python bench/fidelity.py --scale cpu-smoke --out /tmp/fid
    PYTHONPATH=src python bench/fidelity.py --scale gpu --out results/fidelity
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fidelity_data import load_corpus, write_task

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (load_model quant, double_quant); "int4" is built by quantize_int4.
QUANT_VARIANTS = {"dense": (None, False), "nf4-dq": ("nf4", True), "nf4": ("nf4", False),
                  "fp4-dq": ("fp4", True), "int4-dq": ("int4", True)}
# fine-tuning method -> base weights (a QUANT_VARIANTS key) and whether the whole model trains.
METHODS = {"full": ("dense", True), "lora16": ("dense", False), "qlora-nf4-dq": ("nf4-dq", False),
           "qlora-nf4": ("nf4", False), "qlora-fp4-dq": ("fp4-dq", False), "qlora-int4-dq": ("int4-dq", False)}


@dataclass(frozen=True)
class Scale:
    """Everything that changes between a CPU smoke run and the GPU run."""

    train_bytes: int
    held_out_bytes: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    eval_windows: int
    task_train: int
    task_eval: int
    task_max_chars: int
    ft_steps: int
    ft_batch: int
    rank: int
    full_lrs: tuple[float, ...]
    lora_lrs: tuple[float, ...]


SCALES = {
    "cpu-smoke": Scale(train_bytes=400_000, held_out_bytes=60_000, vocab=512, hidden=64, layers=2, heads=4,
                       kv_heads=2, intermediate=128, seq_len=128, pretrain_steps=150, pretrain_batch=8,
                       pretrain_lr=3e-3, eval_windows=32, task_train=256, task_eval=48, task_max_chars=240,
                       ft_steps=16, ft_batch=8, rank=8, full_lrs=(1e-3, 3e-3, 1e-2), lora_lrs=(3e-3, 1e-2, 3e-2)),
    "gpu": Scale(train_bytes=200_000_000, held_out_bytes=200_000_000, vocab=8192, hidden=512, layers=8, heads=8,
                 kv_heads=8, intermediate=1376, seq_len=512, pretrain_steps=3000, pretrain_batch=32,
                 pretrain_lr=1e-3, eval_windows=512, task_train=20_000, task_eval=1000, task_max_chars=1200,
                 ft_steps=300, ft_batch=16, rank=16, full_lrs=(1e-5, 3e-5, 1e-4), lora_lrs=(1e-4, 3e-4, 1e-3)),
}


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on CUDA (as ``qlora train`` does); CPU runs in fp32."""
    return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext()


def mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
              dtype: torch.dtype) -> float:
    """Next-token loss per trainable label token over ``batches`` (the Trainer's eval metric)."""
    from qlora.train.data import count_trainable_tokens
    from qlora.train.trainer import token_loss_sum

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad(), autocast(device, dtype):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            total += token_loss_sum(model, batch).item()
            tokens += count_trainable_tokens(batch)
    return total / max(tokens, 1)


# ---------------------------------------------------------------- pretraining
def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All texts as one id stream, each file ended by EOS."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def lm_batches(stream: torch.Tensor, seq_len: int, batch: int, windows: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive non-overlapping windows of the held-out stream, every token a label."""
    n = min(windows, (len(stream) - 1) // seq_len)
    rows = stream[:n * seq_len].view(n, seq_len)
    return [{"input_ids": rows[i:i + batch], "labels": rows[i:i + batch],
             "attention_mask": torch.ones_like(rows[i:i + batch])} for i in range(0, n, batch)]


def pretrain(corpus, scale: Scale, out_dir: Path, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Train the tokenizer and the model; save both to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    from qlora.model.shard_bar import shard_bar
    from qlora.model.tiny import tiny_config, train_tokenizer
    from qlora.train.trainer import token_loss_sum

    tokenizer = train_tokenizer(corpus.train, vocab_size=scale.vocab)
    config = tiny_config("llama", len(tokenizer), hidden=scale.hidden, layers=scale.layers, heads=scale.heads,
                         kv_heads=scale.kv_heads, intermediate=scale.intermediate, max_positions=scale.seq_len)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    stream = token_stream(corpus.train, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=scale.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, scale.pretrain_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(s / scale.pretrain_steps, 1.0)))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(scale.pretrain_steps):
        starts = torch.randint(0, len(stream) - scale.seq_len - 1, (scale.pretrain_batch,), generator=gen)
        rows = torch.stack([stream[s:s + scale.seq_len] for s in starts.tolist()]).to(device)
        with autocast(device, dtype):
            loss = token_loss_sum(model, {"input_ids": rows, "labels": rows}) / (rows.numel() - len(rows))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with shard_bar(sum(t.nbytes for t in model.state_dict().values())):  # no bar's noise in the bench's log
        model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "train_tokens": len(stream),
            "tokens_seen": scale.pretrain_steps * scale.pretrain_batch * scale.seq_len,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:])}


# ------------------------------------------------------------ model variants
def quantize_int4(model: nn.Module, double_quant: bool, compute_dtype: torch.dtype, blocksize: int = 64) -> int:
    """Swap every decoder linear for a ``Linear4bit`` holding symmetric INT4 codes
    (the baseline ``quantize_4bit`` refuses); returns how many were swapped."""
    from qlora.model.quantize import is_skipped, output_embedding_names, replace_modules
    from qlora.nn import Linear4bit
    from qlora.quant.fourbit import _quantize

    skip = {"lm_head"} | output_embedding_names(model)

    def make(path: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.Linear) or is_skipped(path, skip):
            return None
        layer = Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                           compute_dtype=compute_dtype, quant_type="int4", blocksize=blocksize,
                           double_quant=double_quant, device=module.weight.device)
        layer.load_quant_state(*_quantize(module.weight.detach().to(compute_dtype), "int4", blocksize, double_quant))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    return len(replace_modules(model, make))


def load_variant(model_dir: Path, variant: str, device: torch.device, dtype: torch.dtype):
    """The pretrained model with its linears stored as ``variant`` (all base weights frozen)."""
    from qlora import load_model

    quant, dq = QUANT_VARIANTS[variant]
    model, tokenizer = load_model(model_dir, quant=None if quant == "int4" else quant, double_quant=dq,
                                  compute_dtype=dtype, device=device)
    if quant == "int4":
        quantize_int4(model, dq, dtype)
    return model, tokenizer


# ---------------------------------------------------------------- fine-tuning
def task_units(path: Path, tokenizer, seq_len: int):
    """Tokenized alpaca examples through qlora's own data pipeline (ChatML, loss on the answer)."""
    from qlora.train.data import load_records, normalize, resolve_chat_template, tokenize_dataset

    units, report = tokenize_dataset(normalize(load_records(path), "alpaca"), tokenizer,
                                     resolve_chat_template(tokenizer, "auto"), "assistant", seq_len)
    return units, report.summary()


def finetune(model_dir: Path, method: str, lr: float, train_units, eval_batches, scale: Scale,
             device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """One fine-tuning run; returns its held-out task loss and last training losses."""
    from qlora import add_lora
    from qlora.train.data import count_trainable_tokens, pad_collate, pad_token_id, shuffled_indices
    from qlora.train.trainer import token_loss_sum

    variant, full = METHODS[method]
    # Full fine-tuning keeps fp32 master weights (bf16 autocast on CUDA), as mixed-precision training does.
    model, tokenizer = load_variant(model_dir, variant, device, torch.float32 if full else dtype)
    torch.manual_seed(seed)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        add_lora(model, r=scale.rank, alpha=2.0 * scale.rank, dropout=0.05, target_modules=TARGETS, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, scale.ft_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    pad, n, losses = pad_token_id(tokenizer), len(train_units), []
    start = time.perf_counter()
    for step in range(scale.ft_steps):
        model.train()
        picks = [step * scale.ft_batch + i for i in range(scale.ft_batch)]
        units = [train_units[shuffled_indices(n, seed, p // n)[p % n]] for p in picks]
        batch = {k: v.to(device) for k, v in pad_collate(units, pad).items()}
        with autocast(device, dtype):
            loss = token_loss_sum(model, batch) / count_trainable_tokens(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    eval_loss = mean_loss(model, eval_batches, device, dtype)
    return {"lr": lr, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)),
            "train_loss_last": sum(losses[-5:]) / len(losses[-5:]), "trainable_params": sum(p.numel() for p in params),
            "seconds": round(time.perf_counter() - start, 2)}


# --------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    """The two result tables (zero-shot, fine-tuning) as Markdown."""
    dense = results["zero_shot"]["dense"]["loss"]
    lines = [f"Scale `{results['scale_name']}`, model {results['pretrain']['params']:,} parameters, "
             f"Python {results['provenance']['python']}, compute {results['compute_dtype']} on {results['device']}.",
             "", "Zero-shot, held-out corpus:", "",
             "| weights | loss | perplexity | vs dense |", "|---|---|---|---|"]
    for name, row in results["zero_shot"].items():
        lines.append(f"| {name} | {row['loss']:.4f} | {row['ppl']:.2f} | {100 * (row['loss'] / dense - 1):+.2f}% |")
    base = results["finetune"]["lora16"]["eval_loss"]
    pre = results["pretrained_task"]
    lines += ["", "Fine-tuning, held-out task (best LR of the sweep):", "",
              "| method | best lr | loss | perplexity | vs lora16 | losses at each lr |", "|---|---|---|---|---|---|",
              f"| pretrained, not fine-tuned | - | {pre['loss']:.4f} | {pre['ppl']:.2f} | "
              f"{100 * (pre['loss'] / base - 1):+.2f}% | - |"]
    for name, row in results["finetune"].items():
        sweep = ", ".join(f"{r['lr']:g}: {r['eval_loss']:.4f}" for r in row["runs"])
        lines.append(f"| {name} | {row['best_lr']:g} | {row['eval_loss']:.4f} | {row['eval_ppl']:.2f} | "
                     f"{100 * (row['eval_loss'] / base - 1):+.2f}% | {sweep} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Zero-shot perplexity per storage type; held-out task loss against LR per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["zero_shot"])
    left.bar(names, [results["zero_shot"][n]["ppl"] for n in names], color="tab:blue")
    left.set_ylim(min(results["zero_shot"][n]["ppl"] for n in names) * 0.95)
    left.set(title="zero-shot held-out perplexity", ylabel="perplexity")
    for name, row in results["finetune"].items():
        right.plot([r["lr"] for r in row["runs"]], [r["eval_loss"] for r in row["runs"]], marker="o", label=name)
    right.axhline(results["pretrained_task"]["loss"], color="gray", linestyle="--", label="not fine-tuned")
    right.set(xscale="log", title="fine-tuning: held-out task loss", xlabel="learning rate", ylabel="loss")
    right.legend(fontsize=8)
    fig.suptitle(f"qlora fidelity, scale {results['scale_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(scale_name: str, out: Path, seed: int, device: torch.device) -> dict:
    """The whole benchmark; writes results.json, results.md and fidelity.png under ``out``."""
    scale = SCALES[scale_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timings, t0 = {}, time.perf_counter()
    corpus = load_corpus(scale.train_bytes, scale.held_out_bytes)
    task = write_task(out / "task", scale.task_train, scale.task_eval, scale.task_max_chars)
    timings["data_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    model_dir = out / "pretrained"
    pre = pretrain(corpus, scale, model_dir, device, dtype, seed)
    timings["pretrain_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    zero_shot, held_batches, eval_batches, task_train = {}, None, None, None
    for variant in QUANT_VARIANTS:
        model, tokenizer = load_variant(model_dir, variant, device, dtype)
        if held_batches is None:
            held_batches = lm_batches(token_stream(corpus.held_out, tokenizer), scale.seq_len, scale.ft_batch,
                                      scale.eval_windows)
            task_train, task["train_report"] = task_units(out / "task" / "train.jsonl", tokenizer, scale.seq_len)
            task_eval, task["eval_report"] = task_units(out / "task" / "eval.jsonl", tokenizer, scale.seq_len)
            pad = tokenizer.pad_token_id
            from qlora.train.data import pad_collate

            eval_batches = [pad_collate(task_eval[i:i + scale.ft_batch], pad)
                            for i in range(0, len(task_eval), scale.ft_batch)]
            pretrained_task = mean_loss(model, eval_batches, device, dtype)
        loss = mean_loss(model, held_batches, device, dtype)
        zero_shot[variant] = {"loss": loss, "ppl": math.exp(loss)}
        del model
    timings["zero_shot_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    finetuned = {}
    for method, (_, full) in METHODS.items():
        runs = [finetune(model_dir, method, lr, task_train, eval_batches, scale, device, dtype, seed)
                for lr in (scale.full_lrs if full else scale.lora_lrs)]
        best = min(runs, key=lambda r: r["eval_loss"])
        finetuned[method] = {"best_lr": best["lr"], "eval_loss": best["eval_loss"], "eval_ppl": best["eval_ppl"],
                             "runs": runs}
        print(f"{method}: best lr {best['lr']:g}, held-out task loss {best['eval_loss']:.4f}", file=sys.stderr)
    timings["finetune_s"] = round(time.perf_counter() - t0, 2)

    results = {
        "scale_name": scale_name, "scale": asdict(scale), "seed": seed, "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "provenance": corpus.provenance, "task": task, "pretrain": pre, "zero_shot": zero_shot,
        "pretrained_task": {"loss": pretrained_task, "ppl": math.exp(pretrained_task)},
        "finetune": finetuned, "setup": {
            "lora": {"r": scale.rank, "alpha": 2 * scale.rank, "dropout": 0.05, "targets": TARGETS},
            "optimizer": "torch.optim.AdamW, weight decay 0, 10% linear warmup then constant, grad clip 0.3",
            "full_finetune": "all parameters, fp32 master weights, bf16 autocast on CUDA",
            "quant": "blocksize 64; output head dense; int4 = symmetric absmax code of qlora.quant.codebook",
        }, "timings": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "fidelity.png")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu-smoke")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json, results.md, fidelity.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for cpu-smoke, whose tiny matmuls only lose to thread "
                             "synchronization on a busy shared CPU; torch's default otherwise)")
    args = parser.parse_args()
    threads = args.threads if args.threads is not None else (1 if args.scale == "cpu-smoke" else 0)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    results = run(args.scale, args.out, args.seed, torch.device(args.device))
    print(markdown(results))
    print(f"wrote {args.out}/results.json, results.md, fidelity.png in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
