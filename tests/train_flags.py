"""Flags of the tiny CPU runs of examples/pretrain_gpt.py shared by the entry-point tests."""

from tests.dist_harness import REPO

CPU = "@" + str(REPO / "examples" / "cpu.args")

# A Megatron-LM command line for a 2-layer, 4-expert MoE on mock data (dropout off, so runs are
# comparable bit for bit; see docs/design.md on CPU RNG).
TINY = [CPU, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--disable-bias-linear", "--seq-length", "16", "--max-position-embeddings", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "63",
        "--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--eval-iters", "0", "--log-interval", "1",
        "--ckpt-format", "torch_dist", "--lr", "1e-2", "--weight-decay", "0"]

# DR-LoRA on top: ranks 2 -> 8 at budget 4, growth at iterations 2, 4, 6 of 8.
DRLORA = ["--drlora-budget", "4", "--drlora-p-grow", "0.5", "--drlora-grow-interval", "2",
          "--drlora-grow-buffer", "1", "--lr-warmup-iters", "2", "--train-iters", "8",
          "--save-interval", "4"]
EVENTS = [2, 4, 6]

LAYOUTS = {
    "dp2": [],
    "ep2": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}
