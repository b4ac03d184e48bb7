"""Hardware profiles: one TOML file per target, loaded and validated into a ``Profile``.

Built-in files live next to this module (``h100``, ``a100``, ``l4``, ``cpu-generic``); ``slimfx profile
calibrate`` writes one measured on the local machine. A profile is refused with the offending field named.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str  # "cuda" | "cpu"
    peak_tflops: dict[str, float]  # dense peak per dtype
    memory_bandwidth_gbs: float
    launch_overhead_us: float
    rank_multiple: int
    matmul_efficiency: float
    memory_efficiency: float
    knee_gflop: float  # fixed FLOP-equivalent cost per GEMM: small GEMMs do not reach peak
    pack_flops_per_weight: float  # FLOP-equivalent cost per weight element per GEMM call (panel packing)
    conv_efficiency: float  # convs reach this fraction of the GEMM rate
    sparse_speedup: float
    sparse_dtypes: tuple[str, ...]
    sparse_extra_overhead_us: float
    int8_weight_only: bool
    int4_weight_only: bool
    dequant_overhead: float
    source: str = field(default="", compare=False)
    measured: dict[str, Any] = field(default_factory=dict, compare=False)

    def peak_flops(self, dtype: str) -> float:
        """Sustained FLOP/s for ``dtype`` (falls back to fp32 when the target has no faster path)."""
        if dtype not in self.peak_tflops:
            dtype = "fp32"
        return self.peak_tflops[dtype] * 1e12 * self.matmul_efficiency

    @property
    def bandwidth(self) -> float:
        """Sustained bytes/s."""
        return self.memory_bandwidth_gbs * 1e9 * self.memory_efficiency

    def supports_2_4(self, dtype: str) -> bool:
        return dtype in self.sparse_dtypes and self.sparse_speedup > 1.0


def _get(table: dict, key: str, kind: type, where: str, *, positive: bool = True, optional: Any = None) -> Any:
    if key not in table:
        if optional is not None:
            return optional
        raise ProfileError(f"{where}: missing field {key!r}")
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ProfileError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    if kind in (int, float) and (value < 0 or (positive and value == 0)):
        raise ProfileError(f"{where}: field {key!r} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def parse_profile(data: dict, source: str) -> Profile:
    where = f"profile {source}"
    peaks = _get(data, "peak_tflops", dict, where)
    if "fp32" not in peaks:
        raise ProfileError(f"{where}: missing field 'peak_tflops.fp32'")
    for key in peaks:
        if key not in DTYPES:
            raise ProfileError(f"{where}: unknown dtype 'peak_tflops.{key}'; known: {', '.join(DTYPES)}")
    peak = {k: _get(peaks, k, float, f"{where} [peak_tflops]") for k in peaks}
    eff = _get(data, "efficiency", dict, where)
    sparse = _get(data, "sparse_2_4", dict, where)
    quant = _get(data, "quant", dict, where, optional={})
    device = _get(data, "device", str, where)
    if device not in ("cuda", "cpu"):
        raise ProfileError(f"{where}: field 'device' must be 'cuda' or 'cpu', got {device!r}")
    dtypes = tuple(_get(sparse, "dtypes", list, f"{where} [sparse_2_4]", optional=[]))
    for efficiency_key in ("matmul", "memory"):
        if _get(eff, efficiency_key, float, f"{where} [efficiency]") > 1.0:
            raise ProfileError(f"{where} [efficiency]: field {efficiency_key!r} is a fraction of peak and must be <= 1")
    return Profile(
        name=_get(data, "name", str, where),
        description=_get(data, "description", str, where, optional=""),
        device=device,
        peak_tflops=peak,
        memory_bandwidth_gbs=_get(data, "memory_bandwidth_gbs", float, where),
        launch_overhead_us=_get(data, "launch_overhead_us", float, where, positive=False),
        rank_multiple=_get(data, "rank_multiple", int, where),
        matmul_efficiency=eff["matmul"] * 1.0,
        memory_efficiency=eff["memory"] * 1.0,
        knee_gflop=_get(eff, "knee_gflop", float, f"{where} [efficiency]", positive=False),
        pack_flops_per_weight=_get(eff, "pack_flops_per_weight", float, f"{where} [efficiency]", positive=False,
                                   optional=0.0),
        conv_efficiency=_get(eff, "conv", float, f"{where} [efficiency]", optional=1.0),
        sparse_speedup=_get(sparse, "speedup", float, f"{where} [sparse_2_4]"),
        sparse_dtypes=dtypes,
        sparse_extra_overhead_us=_get(sparse, "extra_overhead_us", float, f"{where} [sparse_2_4]", positive=False),
        int8_weight_only=bool(quant.get("int8_weight_only", False)),
        int4_weight_only=bool(quant.get("int4_weight_only", False)),
        dequant_overhead=_get(quant, "dequant_overhead", float, f"{where} [quant]", optional=1.0),
        source=source,
        measured=dict(data.get("measured", {})),
    )


def builtin_profiles() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in resources.files(__package__).iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (``"h100"``) or a TOML file by path."""
    path = Path(str(name_or_path))
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise ProfileError(f"profile file {path} does not exist")
        text, source = path.read_text(), str(path)
    else:
        name = str(name_or_path)
        if name not in builtin_profiles():
            raise ProfileError(
                f"unknown hardware profile {name!r}; known profiles: {', '.join(builtin_profiles())} "
                "(or pass the path of a .toml file, e.g. one written by `slimfx profile calibrate`)"
            )
        text, source = resources.files(__package__).joinpath(f"{name}.toml").read_text(), name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source} is not valid TOML: {exc}") from exc
    return parse_profile(data, source)


def calibrated_path(device: str | None = None) -> Path:
    """Where ``slimfx profile calibrate`` keeps this machine's measured profile: ``$SLIMFX_CACHE/profiles``."""
    from ..models import cache_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return cache_dir() / "profiles" / f"local-{device}.toml"


def builtin_cpu_profile(cpuinfo: str | None = None) -> str:
    """cpu-vnni where the cores have int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX: an int8 GEMM then
    runs several times the float rate), else cpu-generic; read from ``/proc/cpuinfo`` (Linux) unless given."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "cpu-generic"
    flags = set(re.findall(r"[a-z0-9_]+", " ".join(line for line in cpuinfo.splitlines() if line.startswith("flags"))))
    return "cpu-vnni" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} else "cpu-generic"


def local_profile() -> Profile:
    """This machine's profile: the one ``slimfx profile calibrate`` measured and cached, if any, else the built-in
    one for its device (a known GPU by its name; on a CPU cpu-vnni or cpu-generic, ``builtin_cpu_profile``)."""
    cached = calibrated_path()
    if cached.exists():
        return load_profile(cached)
    if torch.cuda.is_available():
        words = set(re.split(r"[^a-z0-9]+", torch.cuda.get_device_name().lower()))  # "NVIDIA H100 80GB HBM3"
        for known in ("h100", "a100", "l4"):
            if known in words:
                return load_profile(known)
        raise ProfileError(f"no built-in profile for {torch.cuda.get_device_name()}; pass profile= (one of "
                           f"{', '.join(builtin_profiles())}, or a file from `slimfx profile calibrate`)")
    return load_profile(builtin_cpu_profile())


def resolve_profile(profile: Any, default_local: bool = False) -> Profile | None:
    """None, a Profile, a built-in name or a path -> Profile. None stays None (no cost gating) unless
    ``default_local``: then it is this machine's profile (``local_profile``), as the entry points use it;
    ``"none"`` asks for no cost gating there."""
    if isinstance(profile, str) and profile == "none":
        return None
    if profile is None:
        return local_profile() if default_local else None
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, (str, Path)):
        return load_profile(profile)
    raise ProfileError(f"a profile is a name, a .toml path or a Profile, got {type(profile).__name__}")


def to_toml(profile: Profile, comments: dict[str, str] | None = None) -> str:
    """Serialize (used by calibration). ``comments`` annotate fields with how they were measured."""
    comments = comments or {}

    def line(key: str, value: Any) -> str:
        text = f'"{value}"' if isinstance(value, str) else ("true" if value is True else "false" if value is False
                                                            else repr(value) if not isinstance(value, list)
                                                            else "[" + ", ".join(f'"{v}"' for v in value) + "]")
        note = f"  # {comments[key]}" if key in comments else ""
        return f"{key} = {text}{note}"

    out = [f"# {profile.description}", line("name", profile.name), line("description", profile.description),
           line("device", profile.device), line("memory_bandwidth_gbs", round(profile.memory_bandwidth_gbs, 3)),
           line("launch_overhead_us", round(profile.launch_overhead_us, 3)),
           line("rank_multiple", profile.rank_multiple), "", "[peak_tflops]"]
    out += [line(k, round(v, 6)) for k, v in profile.peak_tflops.items()]
    out += ["", "[efficiency]", line("matmul", profile.matmul_efficiency), line("memory", profile.memory_efficiency),
            line("knee_gflop", round(profile.knee_gflop, 6)),
            line("pack_flops_per_weight", round(profile.pack_flops_per_weight, 4)),
            line("conv", round(profile.conv_efficiency, 4)), "", "[sparse_2_4]",
            line("speedup", profile.sparse_speedup), line("dtypes", list(profile.sparse_dtypes)),
            line("extra_overhead_us", profile.sparse_extra_overhead_us), "", "[quant]",
            line("int8_weight_only", profile.int8_weight_only), line("int4_weight_only", profile.int4_weight_only),
            line("dequant_overhead", profile.dequant_overhead)]
    if profile.measured:
        out += ["", "[measured]"] + [line(k, v) for k, v in profile.measured.items()]
    return "\n".join(out) + "\n"
