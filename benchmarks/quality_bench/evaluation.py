"""Evaluation in this process: a run's model at TP1/EP1 (base checkpoint, then `apply_drlora`
with the checkpoint's DR-LoRA config, its adapters, router and rank map), held-out loss on
response tokens + eod and greedy exact-match accuracy per mix domain, and routing counts per
[MoE layer, expert] on the target mix."""

from __future__ import annotations

from typing import Dict, List, Optional


def _by_len(items, length) -> List[List]:
    """`items` grouped by length(item), so each group batches without padding."""
    groups: Dict[int, List] = {}
    for item in items:
        groups.setdefault(length(item), []).append(item)
    return list(groups.values())


class Evaluator:
    def __init__(self, paths: Dict, domains: List[str], max_new_tokens: int = 12):
        from megatron_drlora.data.synthetic import iter_jsonl
        from megatron_drlora.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(paths["tokenizer"])
        self.heldout = {d: [rec for _, rec in iter_jsonl(paths[f"heldout_{d}"])]
                        for d in domains}
        self.probe = [rec for _, rec in iter_jsonl(paths["probe"])]
        self.max_new = max_new_tokens

    def load(self, flags: List[str], run_dir: Optional[str]):
        """The model of a run, built from the run's flags: the base checkpoint, then (run_dir)
        DR-LoRA with the checkpoint's config, its adapters, router and rank map."""
        import torch
        from megatron.core import dist_checkpointing

        from megatron_drlora.checkpoint import (drlora_state, load_adapters,
                                                load_base_checkpoint, resolve)
        from megatron_drlora.config import DRLoRAConfig
        from megatron_drlora.inject import apply_drlora
        from megatron_drlora.megatron_lm.arguments import parse_megatron_args
        from megatron_drlora.modeling import (MoEModelArgs, build_gpt_moe, padded_vocab_size,
                                              transformer_config)
        from megatron_drlora.parallel_setup import ParallelSizes, initialize_megatron_parallel

        args = parse_megatron_args(flags + ["--tensor-model-parallel-size", "1",
                                            "--expert-model-parallel-size", "1"])
        initialize_megatron_parallel(ParallelSizes(), seed=args.seed)
        vocab = padded_vocab_size(self.tokenizer.vocab_size, 1,
                                  args.make_vocab_size_divisible_by)
        model_args = MoEModelArgs.from_megatron_args(args, vocab)
        config = transformer_config(model_args)
        config.perform_initialization = False
        chunks = build_gpt_moe(model_args, config)
        load_base_checkpoint(args.pretrained_checkpoint or args.save, chunks)
        handle, rank_map = None, None
        if run_dir is not None:
            path = resolve(run_dir, "--load")
            state = drlora_state(dist_checkpointing.load_common_state_dict(path))
            handle = apply_drlora(chunks, DRLoRAConfig.from_dict(state["config"]),
                                  log=lambda _: None)
            loaded = load_adapters(path, chunks, handle)
            rank_map = torch.as_tensor(loaded["rank_map"], dtype=torch.int64)
        model = chunks[0]
        model.eval()
        return model, handle, rank_map

    def _encode(self, rec) -> tuple:
        eod = self.tokenizer.eod
        # Training packs documents, so a prompt always follows the previous document's eod.
        prompt = [eod] + self.tokenizer.tokenize(rec["prompt"])
        return prompt, self.tokenizer.tokenize(rec["response"]) + [eod]

    @staticmethod
    def _forward(model, rows: List[List[int]], labels=None):
        import torch

        tokens = torch.tensor(rows, dtype=torch.long)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        return model(tokens, pos, None, labels=lab)

    def score(self, model, batch: int = 512) -> Dict[str, Dict]:
        """Per mix domain: held-out loss (response tokens + eod, mean per token and per prompt)
        and greedy exact-match accuracy, with the per-prompt outcomes ('1'/'0', in file order)
        for paired comparisons."""
        return {domain: self._score_domain(model, domain, recs, batch)
                for domain, recs in self.heldout.items()}

    def _score_domain(self, model, domain: str, records: List[Dict], batch: int) -> Dict:
        import torch

        from megatron_drlora.data.synthetic import is_correct

        encoded = [self._encode(r) for r in records]
        loss_sum, loss_count = 0.0, 0
        outcome = ["0"] * len(records)
        samples = []
        with torch.no_grad():
            for idx in _by_len(range(len(encoded)), lambda i: len(sum(encoded[i], []))):
                for s in range(0, len(idx), batch):
                    chunk = idx[s:s + batch]
                    full = [encoded[i][0] + encoded[i][1] for i in chunk]
                    losses = self._forward(model, [f[:-1] for f in full],
                                           [f[1:] for f in full]).float()
                    for row, i in enumerate(chunk):
                        start = len(encoded[i][0]) - 1  # predicts the first response token
                        loss_sum += float(losses[row, start:].sum())
                        loss_count += losses.shape[1] - start
            vocab = self.tokenizer.vocab_size
            for idx in _by_len(range(len(encoded)), lambda i: len(encoded[i][0])):
                for s in range(0, len(idx), batch):
                    chunk = idx[s:s + batch]
                    rows = [list(encoded[i][0]) for i in chunk]
                    outs: List[List[int]] = [[] for _ in chunk]
                    done = [False] * len(chunk)
                    for _ in range(self.max_new):
                        logits = self._forward(model, rows)
                        nxt = logits[:, -1, :vocab].argmax(dim=-1).tolist()
                        for j, t in enumerate(nxt):
                            if not done[j] and t != self.tokenizer.eod:
                                outs[j].append(t)
                            done[j] = done[j] or t == self.tokenizer.eod
                            rows[j].append(t)
                        if all(done):
                            break
                    for j, i in enumerate(chunk):
                        answer = self.tokenizer.detokenize(outs[j])
                        ok = is_correct(domain, records[i]["prompt"], answer)
                        outcome[i] = "1" if ok else "0"
                        if len(samples) < 4:
                            samples.append({"prompt": records[i]["prompt"], "answer": answer,
                                            "expected": records[i]["response"], "correct": ok})
        correct = outcome.count("1")
        return {"loss": loss_sum / max(1, loss_count), "accuracy": correct / len(records),
                "prompts": len(records), "outcomes": "".join(outcome), "samples": samples}

    def routing(self, model, batch: int = 512) -> Dict[str, List[List[float]]]:
        """Routed (token, expert) assignments per [MoE layer, expert] over the full texts
        (prompt + response) of the target-mix probe, in total and per domain, and the tokens."""
        import torch

        from megatron_drlora.compat import megatron as mcompat

        routers = [layer.mlp.router for layer in model.decoder.layers
                   if mcompat.is_moe_layer(getattr(layer, "mlp", None))]
        current = {"counts": None}

        def hook(index):
            def fn(module, args, output):
                current["counts"][index] += output[1].sum(0).to(torch.float64).cpu()
            return fn

        handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
        by_domain: Dict[str, List] = {}
        for rec in self.probe:
            by_domain.setdefault(rec["domain"], []).append(rec)
        result, tokens = {}, {}
        try:
            with torch.no_grad():
                for domain, recs in sorted(by_domain.items()):
                    experts = routers[0].weight.shape[0]
                    current["counts"] = torch.zeros(len(routers), experts, dtype=torch.float64)
                    texts = [sum(self._encode(r), []) for r in recs]
                    for rows in _by_len(texts, len):
                        for s in range(0, len(rows), batch):
                            self._forward(model, rows[s:s + batch])
                    result[domain] = current["counts"].tolist()
                    tokens[domain] = sum(len(t) for t in texts)
        finally:
            for h in handles:
                h.remove()
        first = next(iter(result.values()))
        total = [[sum(result[d][l][e] for d in result) for e in range(len(first[l]))]
                 for l in range(len(first))]
        return {"counts": total, "counts_by_domain": result, "tokens_by_domain": tokens,
                "tokens": sum(tokens.values())}


def adapter_widths(handle) -> List[int]:
    """in_features + out_features of each adapted projection (full, unsharded): the LoRA
    multiply-adds of one token through one expert's module at rank r are r x this."""
    specs = handle.layers[0].bank.specs
    return [specs[name].in_features + specs[name].out_features for name in specs]
