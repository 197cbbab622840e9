"""The bundled default: a tiny MoE fine-tuned with DR-LoRA on CPU, from nothing, in minutes.

    python examples/demo.py [--out demo_out] [--nproc 2] [--quick]

1. generates a small multi-domain instruction corpus (arithmetic, code, prose, units, dates,
   reverse, sort) with the project's own generator,
2. trains a sentencepiece tokenizer and writes Megatron indexed datasets (loss on responses),
3. trains a tiny MoE base on all domains (full model, expert parallel over --nproc processes),
4. fine-tunes it with DR-LoRA on one domain (expert parallel, growth events every few steps),
5. draws the rank allocation and prints where everything is, with a summary.

Every step is an ordinary command of this repository (tools/*.py, examples/pretrain_gpt.py
under torchrun), printed before it runs, so the demo doubles as a walkthrough.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_drlora.launch.ports import free_port  # noqa: E402


def run(cmd, log_path=None) -> None:
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS="ignore")
    with open(log_path, "w") if log_path else open(os.devnull, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith((" [", " growth", " validation", "> DR-LoRA", "wrote")) \
                    or "Error" in line:
                print(line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"step failed (exit {proc.returncode}); full log: {log_path}")


def torchrun(nproc: int):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            os.path.join(REPO, "examples", "pretrain_gpt.py")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="DR-LoRA demo on CPU")
    p.add_argument("--out", default=os.path.join(REPO, "demo_out"))
    p.add_argument("--nproc", type=int, default=2, help="processes (expert parallel size)")
    p.add_argument("--target-domain", default="arithmetic")
    p.add_argument("--base-iters", type=int, default=500)
    p.add_argument("--finetune-iters", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="much shorter runs (smoke test)")
    args = p.parse_args(argv)
    if args.quick:  # the smoke test; DR-LoRA still reaches its budget (14 growth events)
        args.base_iters, args.finetune_iters = 20, 30
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    py = sys.executable
    corpus, data = os.path.join(out, "corpus"), os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    n_per_domain = 300 if args.quick else 1500

    run([py, "tools/generate_corpus.py", "--num-per-domain", str(n_per_domain), "--seed", "7",
         "--format", "instruction", "--out", corpus])
    tok = os.path.join(data, "tokenizer")
    run([py, "tools/train_tokenizer.py", "--input", os.path.join(corpus, "mixed.jsonl"),
         "--vocab-size", "512", "--model-prefix", tok])
    # the two datasets at once (each is mostly the tool's start-up)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = [pool.submit(run, [py, "tools/preprocess_data.py", "--input",
                                  os.path.join(corpus, source), "--tokenizer-model",
                                  tok + ".model", "--output-prefix", os.path.join(data, name),
                                  "--append-eod"])
                for name, source in (("mixed", "mixed.jsonl"),
                                     ("target", f"{args.target_domain}.jsonl"))]
        for future in done:
            future.result()

    model = ["@" + os.path.join(REPO, "examples", "cpu.args"),
             "--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "256",
             "--num-attention-heads", "4", "--num-experts", "16", "--moe-router-topk", "2",
             "--moe-ffn-hidden-size", "128", "--swiglu", "--normalization", "RMSNorm",
             "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
             "--seq-length", "64", "--max-position-embeddings", "64",
             "--micro-batch-size", "8", "--global-batch-size", "32",
             "--expert-model-parallel-size", str(args.nproc),
             "--moe-token-dispatcher-type", "alltoall",
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok + ".model",
             "--split", "90,10,0", "--seed", "1234", "--ckpt-format", "torch_dist"]
    base_dir = os.path.join(out, "base")
    run(torchrun(args.nproc) + model + [
        "--data-path", os.path.join(data, "mixed_text_document"),
        "--train-iters", str(args.base_iters), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "5" if args.quick else "20",
        "--moe-aux-loss-coeff", "0.01",
        "--log-interval", "50", "--eval-interval", str(args.base_iters), "--eval-iters", "4",
        "--save", base_dir, "--save-interval", str(args.base_iters)],
        os.path.join(out, "base.log"))
    base_loss = validation_losses(os.path.join(out, "base.log"))[-1][1]

    ft_dir = os.path.join(out, "drlora")
    warmup = max(1, args.finetune_iters // 15)
    finetune = model + [
        "--data-path", os.path.join(data, "target_text_document"),
        "--pretrained-checkpoint", base_dir,
        "--train-iters", str(args.finetune_iters), "--lr", "2e-3", "--lr-decay-style", "linear",
        "--lr-warmup-iters", str(warmup), "--weight-decay", "0", "--log-interval", "25",
        # evaluated once, after training, on the same batches as the --skip-train run below
        "--eval-interval", str(args.finetune_iters + 1), "--eval-iters", "4",
        "--drlora-budget", "8", "--drlora-p-grow", "0.5",
        "--drlora-grow-interval", str(max(2, args.finetune_iters // 15)),
        "--drlora-grow-buffer", str(warmup), "--drlora-log-dir", ft_dir]
    # The adapted model before any step (B = 0: exactly the base) on the target data.
    run(torchrun(args.nproc) + finetune + ["--skip-train"], os.path.join(out, "before.log"))
    before = validation_losses(os.path.join(out, "before.log"))[-1][1]
    run(torchrun(args.nproc) + finetune + ["--save", ft_dir, "--save-interval",
                                           str(args.finetune_iters // 2)],
        os.path.join(out, "drlora.log"))
    after = validation_losses(os.path.join(out, "drlora.log"))[-1][1]

    records = [json.loads(line) for line in open(os.path.join(ft_dir, "drlora_ranks.jsonl"))]
    final = records[-1]["rank_map"]
    summary = {"base_valid_loss": base_loss, "valid_loss_before": before,
               "valid_loss_after": after, "seconds": time.time() - start,
               "events": [r["iteration"] for r in records if r["kind"] == "event"],
               "final_rank_map": final}
    with open(os.path.join(out, "demo_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"\nbase model validation loss (all domains): {base_loss:.4f}")
    print("\n" + "=" * 78)
    print(f"DR-LoRA demo finished in {time.time() - start:.0f} s ({args.nproc} processes, CPU)")
    print(f"  base model ({args.base_iters} iterations, all domains): {base_dir}")
    print(f"  adapter checkpoint ({args.finetune_iters} iterations on '{args.target_domain}'): "
          f"{ft_dir}/iter_{args.finetune_iters:07d}")
    print(f"  rank log: {os.path.join(ft_dir, 'drlora_ranks.jsonl')}")
    print(f"  heatmap:  {os.path.join(ft_dir, 'drlora_rank_heatmap.png')}")
    print(f"  growth:   {os.path.join(ft_dir, 'drlora_rank_growth.png')}")
    print(f"  '{args.target_domain}' validation loss: before {before:.4f} -> after {after:.4f}")
    print(f"  growth events at iterations {summary['events']}")
    print("  final ranks per MoE layer (mean / min / max over 16 experts x up,down):")
    for layer, rows in enumerate(final):
        ranks = [r for expert in rows for r in expert]
        print(f"    layer {layer}: {sum(ranks) / len(ranks):.2f} / {min(ranks)} / {max(ranks)}")
    print("=" * 78)
    return 0


def validation_losses(log_path: str):
    """(iteration, lm loss) of every validation line Megatron-LM printed into a log."""
    found = []
    for line in open(log_path):
        m = re.search(r"validation loss at iteration (\d+) on validation set \| lm loss value: "
                      r"([0-9.eE+-]+)", line)
        if m:
            found.append((int(m.group(1)), float(m.group(2))))
    if not found:
        raise SystemExit(f"{log_path}: Megatron-LM printed no validation loss")
    return found


if __name__ == "__main__":
    sys.exit(main())
