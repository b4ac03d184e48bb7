"""Hardware targets as data, and the cost model that prices canonical ops on them."""
from .op_costs import COST_RULES, OpCost, node_cost, program_flops

__all__ = ["COST_RULES", "OpCost", "node_cost", "program_flops"]
