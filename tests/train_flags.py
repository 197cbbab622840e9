"""Flags of the tiny CPU runs of examples/pretrain_gpt.py shared by the entry-point tests."""

import atexit
import os
import shutil
import tempfile

from tests.dist_harness import REPO

CPU = "@" + str(REPO / "examples" / "cpu.args")


def tiny_dataset(directory=None) -> str:
    """A Megatron indexed dataset (prefix) of --mock-data's kind of documents, small.

    `--mock-data` builds Megatron's sample and shuffle indices over 100,000 documents of up
    to 4096 tokens (millions of 16-token samples per split): seconds of every launch. This
    has 64 documents made like MockGPTLowLevelDataset's (token i+1 mod the vocabulary, then
    eod; lengths drawn from a seeded generator, here below 256): 8,000-odd tokens, over 500
    samples of 16 tokens (60 iterations of 8 sequences) in one epoch, for Megatron's
    NullTokenizer with --vocab-size 63 (ids < 63, eod 62). Written once per test process into
    a temporary folder removed at exit (or into `directory`)."""
    import numpy

    from megatron_drlora.compat.megatron import prepare_import

    prepare_import()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if directory is None:
        directory = tempfile.mkdtemp(prefix="drlora_tiny_data")
        atexit.register(shutil.rmtree, directory, True)
    prefix = os.path.join(str(directory), "tiny_text_document")
    vocab, eod = 63, 62
    lengths = numpy.random.default_rng(0).integers(1, 256, size=64)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for length in lengths:
        doc = numpy.concatenate([(numpy.arange(length - 1) + 1) % vocab, [eod]])
        builder.add_document(numpy.asarray(doc, dtype=numpy.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


DATA = tiny_dataset()

# A Megatron-LM command line for a 2-layer, 4-expert MoE on DATA (dropout off, so runs are
# comparable bit for bit; see docs/design.md on CPU RNG). All of DATA is the training split.
TINY = [CPU, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-experts", "4", "--moe-router-topk", "2", "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--disable-bias-linear", "--seq-length", "16", "--max-position-embeddings", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8",
        "--data-path", DATA, "--split", "100,0,0",
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
