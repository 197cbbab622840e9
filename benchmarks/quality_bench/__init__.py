"""The quality benchmark (`python benchmarks/quality.py`), in parts:

- `data`: corpus, tokenizer, the target mix (a frequent domain the base already solves plus a
  rarer one it does not), held-out splits and routing probes;
- `runs`: the flags of the base and of every variant, runs of `examples/pretrain_gpt.py` under
  torchrun, what their logs say, the growth plan;
- `evaluation`: a run's model in this process: held-out loss and greedy exact-match accuracy
  per domain, routing counts per expert;
- `allocation`: the frequency-proportional static rank map, LoRA FLOPs per target token, the
  FLOPs-matched uniform rank, where the ranks went;
- `statistics`: mean and spread over seeds, paired per-seed differences with t-intervals;
- `report`: quality.md, the verdicts and the allocation pictures;
- `main`: the command line and the order of the runs.
"""
