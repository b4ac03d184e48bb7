"""Hardware targets as data (one TOML per target), and the roofline cost model that prices ops on them."""
from .cost_model import Kernel, break_even, break_even_rank, kernel_latency, latency
from .op_costs import COST_RULES, ProgramCost, node_kernels, program_cost, program_flops
from .profiles import Profile, builtin_profiles, load_profile, resolve_profile

__all__ = ["COST_RULES", "Kernel", "Profile", "ProgramCost", "break_even", "break_even_rank", "builtin_profiles",
           "kernel_latency", "latency", "load_profile", "node_kernels", "program_cost", "program_flops",
           "resolve_profile"]
