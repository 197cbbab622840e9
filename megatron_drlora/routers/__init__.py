"""Routers Megatron-Core does not ship, installed by the model builders when the model's flags
ask for them (`--moe-router-type`)."""

from megatron_drlora.routers.sparsemixer import ROUTER_TYPES, router_builder, sparsemixer

__all__ = ["ROUTER_TYPES", "router_builder", "sparsemixer"]
