"""Flags of a tiny CPU training run shared by the entry-point tests."""

TINY_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
              "--num-experts", "4", "--moe-router-topk", "2", "--swiglu",
              "--normalization", "RMSNorm", "--position-embedding-type", "rope",
              "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
              "--mock-data", "--vocab-size", "64", "--init-from-identity"]

DRLORA = ["--drlora-budget", "8", "--drlora-p-grow", "0.5", "--drlora-grow-interval", "3", "--drlora-grow-buffer", "2",
          "--lr", "2e-2", "--lr-warmup-iters", "2", "--log-interval", "2"]
