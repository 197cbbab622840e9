"""DRLoRAConfig: every DR-LoRA setting in one validated dataclass.

The dataclass is the single source of truth: the `--drlora-*` command-line flags, the YAML file
format and the defaults all come from its fields, so a new setting is added in exactly one place.
Defaults follow the paper (arXiv 2601.04823, Table 6 and section 3); see
docs/design.md for the decisions taken where the paper is ambiguous.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

PROJECTIONS = ("gate", "up", "down")
SALIENCY_VARIANTS = ("full", "frequency", "importance")
FREQUENCY_SOURCES = ("weight", "count")
ALLOCATION_SCOPES = ("layer", "global")
METHODS = ("drlora", "uniform")
ROUTER_MODES = ("warmup_frozen", "frozen", "trained")
SHARED_EXPERT_MODES = ("none", "uniform")


class DRLoRAConfigError(ValueError):
    """A DR-LoRA setting is invalid; the message names the field/flag and the fix."""


def _opt(default, help, cli=None, choices=None, **kw):
    """A dataclass field carrying its help text, optional CLI name and choices."""
    meta = {"help": help}
    if cli:
        meta["cli"] = cli
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta, **kw)


@dataclass
class DRLoRAConfig:
    """Settings of DR-LoRA. `DRLoRAConfig(budget=16)` gives r_init 8, r_max 32, alpha 64."""

    budget: int = _opt(16, "r_target: the average final LoRA rank per adapted module; the "
                       "parameter budget equals uniform LoRA at this rank.")
    r_init: Optional[int] = _opt(None, "Initial active rank of every module (default budget/2).",
                                 cli="rank-init")
    r_max: Optional[int] = _opt(None, "Allocated (maximum) rank of every module "
                                "(default 2*budget).", cli="rank-max")
    alpha: Optional[float] = _opt(None, "LoRA alpha; the constant scale is alpha/r_max "
                                  "(default 2*r_max, i.e. scale 2).")
    dropout: float = _opt(0.0, "Dropout on the adapter input (the authors' code uses 0.1; 0 keeps "
                          "runs bitwise reproducible across parallel layouts).")
    targets: Tuple[str, ...] = _opt(("up", "down"), "Expert projections that get adapters: any "
                                    "of gate, up, down (always visited in that order).",
                                    choices=PROJECTIONS)
    beta: float = _opt(0.9, "EMA factor of routing frequency and rank importance (Eq. 5, 7).")
    gamma: float = _opt(1.2, "Rank penalty exponent of the saliency (Eq. 9); 0 disables the "
                        "penalty.")
    p_grow: float = _opt(0.1, "Per-event cap as a fraction of (r_max - r_init) (Eq. 12).")
    grow_interval: int = _opt(200, "T_grow: optimizer steps between growth events.")
    grow_buffer: int = _opt(200, "T_buffer: no growth in the last T_buffer steps.")
    warmup_iters: Optional[int] = _opt(None, "t_warmup: first growth event and end of the "
                                       "router freeze (default: the LR warm-up iterations).")
    allocation: str = _opt("layer", "Budget scope: per layer (paper) or global across layers.",
                           choices=ALLOCATION_SCOPES)
    saliency: str = _opt("full", "Saliency variant: full (frequency x importance), frequency "
                         "only, importance only.", choices=SALIENCY_VARIANTS)
    frequency: str = _opt("weight", "Routing frequency from routed probabilities (paper) or hard "
                          "token counts (authors' code).", choices=FREQUENCY_SOURCES)
    method: str = _opt("drlora", "drlora (dynamic ranks) or uniform (plain LoRA at budget, "
                       "no growth: the baseline).", choices=METHODS)
    router: str = _opt("warmup_frozen", "Router training: frozen during warm-up then trained "
                       "(paper), always frozen, or always trained.", choices=ROUTER_MODES)
    seed: int = _opt(1234, "Seed of the adapter init; the init of (layer, expert, projection) "
                     "depends only on this seed, never on the parallel layout.")
    shared_experts: str = _opt("none", "Shared experts: no adapter (paper), or uniform LoRA at "
                               "r_target on the shared expert's target projections, counted "
                               "outside the DR-LoRA budget (never grown, no saliency).",
                               choices=SHARED_EXPERT_MODES)
    rank_map: Optional[List] = _opt(None, "A fixed heterogeneous allocation: a JSON file with "
                                    "the ranks [MoE layer][expert][target projection] (a list, "
                                    "or {\"rank_map\": list}), each in [0, r_max]. The run "
                                    "starts from it and never grows; every layer (global "
                                    "allocation: the model) must fit the budget.",
                                    cli="rank-map")
    rank_pool: bool = _opt(True, "Hold each MoE layer's LoRA ranks in a pool of rank slots "
                           "sized by the budget (the default): adapter memory uniform LoRA at "
                           "r_target at EP=1 with layer allocation. --no-drlora-rank-pool "
                           "(rank_pool: false) gives every expert its factors at r_max instead "
                           "(the dense bank: uniform LoRA at r_max's memory; needed for "
                           "--use-precision-aware-optimizer, --optimizer-cpu-offload and to "
                           "resume a dense bank's checkpoint). See docs/design.md.")
    rank_pool_capacity: Optional[float] = _opt(
        None, "With the rank pool: each expert-parallel rank's pool holds at most this "
        "many times its experts' share of uniform LoRA at r_target (>= 1, e.g. 1.1) and growth "
        "never gives one rank's experts of a layer more ranks than that: bounds adapter memory "
        "at EP > 1, where an unbounded pool may need up to r_max per module; the allocation "
        "then departs from the paper's where one rank's experts would take more (opt-in).")

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        # The paper visits an expert's modules in a fixed order (gate, up, down), so the
        # growth order must not depend on how the user spelled --drlora-targets.
        rank = {p: i for i, p in enumerate(PROJECTIONS)}
        self.targets = tuple(sorted(self.targets, key=lambda t: rank.get(t, len(rank))))
        if isinstance(self.rank_map, str):  # a file name: the config keeps the map itself
            self.rank_map = read_rank_map_file(self.rank_map)
        self.validate()

    # --- derived values -------------------------------------------------------------------
    @property
    def rank_init(self) -> int:
        if self.method == "uniform":
            return self.budget
        return self.r_init if self.r_init is not None else max(1, self.budget // 2)

    @property
    def rank_max(self) -> int:
        if self.method == "uniform":
            return self.budget
        return self.r_max if self.r_max is not None else 2 * self.budget

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank_max

    @property
    def scale(self) -> float:
        """Constant LoRA scale s = alpha / r_max; never rescaled by the active rank."""
        return self.lora_alpha / self.rank_max

    @property
    def grows(self) -> bool:
        return self.method == "drlora" and self.rank_init < self.budget and self.rank_map is None

    # --- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, msg):
            raise DRLoRAConfigError(f"DR-LoRA setting '{name}' (--drlora-{_cli(name)}): {msg}")

        for name in ("budget", "grow_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {v!r}")
        if not isinstance(self.grow_buffer, int) or isinstance(self.grow_buffer, bool) \
                or self.grow_buffer < 0:
            bad("grow_buffer", f"must be an integer >= 0, got {self.grow_buffer!r}")
        for name in ("r_init", "r_max", "warmup_iters"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                bad(name, f"must be an integer, got {v!r}")
            if name in ("r_init", "r_max") and v <= 0:
                bad(name, f"must be a positive rank, got {v}")
            if v < 0:
                bad(name, f"must be >= 0, got {v}")
        if self.method not in METHODS:
            bad("method", f"unknown value {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "drlora":
            if self.rank_init > self.budget:
                bad("r_init", f"r_init={self.rank_init} exceeds the budget {self.budget}; "
                    f"lower --drlora-rank-init or raise --drlora-budget")
            if self.budget > self.rank_max:
                bad("budget", f"budget={self.budget} exceeds r_max={self.rank_max}; raise "
                    f"--drlora-rank-max or lower --drlora-budget")
        if self.alpha is not None and (not _is_number(self.alpha) or self.alpha <= 0):
            bad("alpha", f"must be a positive number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            bad("targets", "needs at least one projection (gate, up, down)")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            bad("targets", f"unknown projection(s) {unknown}; choose from {', '.join(PROJECTIONS)}")
        if len(set(self.targets)) != len(self.targets):
            bad("targets", f"lists a projection twice: {list(self.targets)}")
        if not _is_number(self.beta) or not 0.0 <= self.beta < 1.0:
            bad("beta", f"must be in [0, 1), got {self.beta!r}")
        if not _is_number(self.gamma) or self.gamma < 0:
            bad("gamma", f"must be >= 0, got {self.gamma!r}")
        if not _is_number(self.p_grow) or not 0.0 < self.p_grow <= 1.0:
            bad("p_grow", f"must be in (0, 1], got {self.p_grow!r}")
        if self.grows:
            from megatron_drlora.schedule import per_event_cap  # schedule imports this module

            if per_event_cap(self.p_grow, self.rank_max, self.rank_init) < 1:
                bad("p_grow", f"the per-event cap floor((r_max - r_init) * p_grow) = "
                    f"floor(({self.rank_max} - {self.rank_init}) * {self.p_grow}) is 0, so no "
                    f"expert could ever grow; raise --drlora-p-grow or --drlora-rank-max, or "
                    f"lower --drlora-rank-init")
        if self.rank_map is not None:
            self._validate_rank_map(bad)
        if not isinstance(self.rank_pool, bool):
            bad("rank_pool", f"must be true or false, got {self.rank_pool!r}")
        if self.rank_pool_capacity is not None:
            if not _is_number(self.rank_pool_capacity) or not self.rank_pool_capacity >= 1.0:
                bad("rank_pool_capacity", f"must be a number >= 1 (the pool must hold at least "
                    f"its share of the budget), got {self.rank_pool_capacity!r}")
            if not self.rank_pool:
                bad("rank_pool_capacity", "sizes the rank pool, which --no-drlora-rank-pool "
                    "turns off: drop one of the two")
            if self.rank_map is not None:
                bad("rank_pool_capacity", "a fixed --drlora-rank-map sizes the pool by its own "
                    "sum and never grows: drop one of the two")
        for name, choices in (("allocation", ALLOCATION_SCOPES), ("saliency", SALIENCY_VARIANTS),
                              ("frequency", FREQUENCY_SOURCES), ("router", ROUTER_MODES),
                              ("shared_experts", SHARED_EXPERT_MODES)):
            if getattr(self, name) not in choices:
                bad(name, f"unknown value {getattr(self, name)!r}; choose one of "
                    f"{', '.join(choices)}")

    def _validate_rank_map(self, bad) -> None:
        """Shape [layers][experts][len(targets)], integers in [0, r_max], within the budget of
        uniform LoRA at r_target per layer ('layer' allocation) or over the model ('global')."""
        rmap, width = self.rank_map, len(self.targets)
        if self.method != "drlora":
            bad("rank_map", "is a DR-LoRA allocation; it needs --drlora-method drlora")
        if not isinstance(rmap, list) or not rmap or not all(
                isinstance(layer, list) and layer and len(layer) == len(rmap[0])
                and all(isinstance(e, list) and len(e) == width for e in layer)
                for layer in rmap):
            bad("rank_map", f"must be a non-empty [MoE layer][expert][projection] list with "
                f"the same number of experts in every layer and {width} rank(s) per expert "
                f"(targets {','.join(self.targets)})")
        ranks = [r for layer in rmap for e in layer for r in e]
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            bad("rank_map", "ranks must be integers")
        if min(ranks) < 0 or max(ranks) > self.rank_max:
            bad("rank_map", f"ranks must lie in [0, r_max={self.rank_max}], got "
                f"{min(ranks)}..{max(ranks)}")
        modules = len(rmap[0]) * width
        sums = [sum(r for e in layer for r in e) for layer in rmap]
        if self.allocation == "global":
            if sum(sums) > len(rmap) * modules * self.budget:
                bad("rank_map", f"uses {sum(sums)} module-ranks, over the budget "
                    f"{len(rmap)} layers x {modules} modules x r_target {self.budget} = "
                    f"{len(rmap) * modules * self.budget}")
        else:
            over = [(l, s) for l, s in enumerate(sums) if s > modules * self.budget]
            if over:
                bad("rank_map", f"layer {over[0][0]} uses {over[0][1]} module-ranks, over its "
                    f"budget {modules} modules x r_target {self.budget} = "
                    f"{modules * self.budget} ({len(over)} layer(s) over)")

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "dict") -> "DRLoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DRLoRAConfigError(
                f"{source}: unknown DR-LoRA setting(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**data)

    def to_yaml(self, path: Optional[str] = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_yaml(cls, path: str) -> "DRLoRAConfig":
        import yaml

        if not os.path.isfile(path):
            raise DRLoRAConfigError(f"--drlora-config: file {path!r} does not exist")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise DRLoRAConfigError(f"--drlora-config {path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise DRLoRAConfigError(f"--drlora-config {path}: expected a mapping of settings")
        data = data.get("drlora", data)
        return cls.from_dict(data, source=path)

    def summary(self) -> str:
        return (f"DR-LoRA method={self.method} r_init={self.rank_init} r_target={self.budget} "
                f"r_max={self.rank_max} alpha={self.lora_alpha:g} scale={self.scale:g} "
                f"targets={','.join(self.targets)} saliency={self.saliency} "
                f"allocation={self.allocation} beta={self.beta} gamma={self.gamma} "
                f"p_grow={self.p_grow} T_grow={self.grow_interval} T_buffer={self.grow_buffer}"
                f" shared_experts={self.shared_experts}"
                f"{' rank_map=fixed (no growth)' if self.rank_map is not None else ''}"
                f"{' rank_pool' if self.rank_pool else ' dense_bank'}"
                f"{self._capacity_text()}")

    def _capacity_text(self) -> str:
        if self.rank_pool_capacity is None:
            return ""
        return f" rank_pool_capacity={self.rank_pool_capacity:g}"


def read_rank_map_file(path: str) -> List:
    """The rank map of a `--drlora-rank-map` JSON file: a nested list, or {"rank_map": ...}."""
    if not os.path.isfile(path):
        raise DRLoRAConfigError(f"--drlora-rank-map: file {path!r} does not exist")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except ValueError as e:
        raise DRLoRAConfigError(f"--drlora-rank-map {path}: not valid JSON: {e}") from e
    return data.get("rank_map") if isinstance(data, dict) else data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cli(name: str) -> str:
    for f in fields(DRLoRAConfig):
        if f.name == name:
            return f.metadata.get("cli", name.replace("_", "-"))
    return name.replace("_", "-")


def add_drlora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one `--drlora-<name>` flag per config field, plus `--drlora-config FILE.yaml`.

    Flags default to None so that only what the user typed overrides the YAML file.
    """
    group = parser.add_argument_group("DR-LoRA", "Dynamic Rank LoRA for MoE experts")
    group.add_argument("--drlora-config", default=None, metavar="FILE.yaml",
                       help="YAML file with DR-LoRA settings (flags given too override it).")
    for f in fields(DRLoRAConfig):
        flag = f"--drlora-{f.metadata.get('cli', f.name.replace('_', '-'))}"
        kw = dict(dest=f"drlora_{f.name}", default=None, help=f.metadata["help"])
        if f.name == "rank_pool":  # on by default; --no-drlora-rank-pool turns it off
            kw.update(action="store_const", const=True,
                      help="Hold the ranks in a pool of rank slots (the default).")
            group.add_argument(f"--no-drlora-{f.name.replace('_', '-')}", dest=kw["dest"],
                               action="store_const", const=False, default=None,
                               help=f.metadata["help"])
        elif f.name == "targets":
            kw["type"] = lambda s: tuple(t.strip() for t in s.split(",") if t.strip())
            kw["metavar"] = "PROJ[,PROJ]"
        elif f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        elif f.name == "rank_map":
            kw["type"], kw["metavar"] = str, "FILE.json"
        elif f.name in ("alpha", "dropout", "beta", "gamma", "p_grow", "rank_pool_capacity"):
            kw["type"] = float
        else:
            kw["type"] = int
        group.add_argument(flag, **kw)
    return parser


def drlora_flags_given(args: argparse.Namespace) -> bool:
    """True when any `--drlora-*` setting (or a config file) was given."""
    if getattr(args, "drlora_config", None):
        return True
    return any(getattr(args, f"drlora_{f.name}", None) is not None for f in fields(DRLoRAConfig))


def config_from_args(args: argparse.Namespace) -> DRLoRAConfig:
    """Build the config from `--drlora-config` (if any) overridden by explicit flags."""
    base: Dict[str, Any] = {}
    if getattr(args, "drlora_config", None):
        base = DRLoRAConfig.from_yaml(args.drlora_config).to_dict()
    for f in fields(DRLoRAConfig):
        v = getattr(args, f"drlora_{f.name}", None)
        if v is not None:
            base[f.name] = v
    return DRLoRAConfig.from_dict(base, source="--drlora-* flags")
