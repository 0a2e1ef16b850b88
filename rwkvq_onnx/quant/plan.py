"""The quantization plan: weight name -> one method config, with the policy's reasons.

The plan is the contract between the policy (`policy.py`: proxies, budget,
rankings) and the algorithms (`apply.py`). Each entry names an algorithm of
`METHODS` (rtn, gptq, awq, kmeans, gptvq) and holds that algorithm's own
config type; element-wise vectors get an `ElementwiseConfig` each. The plan
round-trips through JSON exactly (`to_json`/`from_json`), so `quantize
--recipe PLAN.json` reapplies a saved (or hand-edited) plan without running
the policy again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import ConfigError
from .configs import AWQConfig, ConfigBase, ElementwiseConfig, GPTQConfig, ScalarConfig, VQConfig

PLAN_FORMAT = "rwkvq-plan/1"
CONFIG_TYPES: dict[str, type[ConfigBase]] = {c.__name__: c for c in (
    ScalarConfig, GPTQConfig, AWQConfig, VQConfig, ElementwiseConfig)}
# The config type each algorithm takes (one per algorithm).
ALGORITHM_CONFIG: dict[str, type[ConfigBase]] = {
    "rtn": ScalarConfig, "gptq": GPTQConfig, "awq": AWQConfig, "kmeans": VQConfig, "gptvq": VQConfig}


@dataclass(frozen=True)
class PlanEntry:
    """One linear weight: its shape [N out, K in], the algorithm, its config and why the policy chose it.

    `reasons` holds what the decision rested on: proxy values (P_c, P_f, n), the
    ranking score and rank, the thresholds or budget in force.
    """

    name: str
    shape: tuple[int, int]
    algorithm: str
    config: ScalarConfig | VQConfig
    reasons: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """'sq' (scalar) or 'vq' (vector)."""
        return "vq" if isinstance(self.config, VQConfig) else "sq"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def bpw(self, accounting: str = "stored") -> float:
        return (self.config.paper_bpw if accounting == "paper" else self.config.bpw)(*self.shape)


@dataclass(frozen=True)
class Plan:
    """Entries for the linear weights (in graph order), configs for the element-wise vectors, and the
    policy's summary (policy name, thresholds or target, accounting, options that produced it)."""

    entries: tuple[PlanEntry, ...]
    elementwise: dict[str, ElementwiseConfig] = field(default_factory=dict)
    policy: dict = field(default_factory=dict)

    def by_name(self) -> dict[str, PlanEntry]:
        return {e.name: e for e in self.entries}

    def subset(self, names: set[str]) -> "Plan":
        """The entries for `names` only (the sequential mode applies a plan block by block)."""
        return Plan(tuple(e for e in self.entries if e.name in names), {}, self.policy)

    def bpw(self, accounting: str = "stored") -> float:
        """Weight-count-weighted mean bpw over the linear weights."""
        n = sum(e.numel for e in self.entries)
        return sum(e.bpw(accounting) * e.numel for e in self.entries) / n if n else 0.0

    def share(self) -> dict[str, dict[str, float]]:
        """SQ and VQ share of the linear weights, by count and by parameters."""
        n_t = len(self.entries) or 1
        n_p = sum(e.numel for e in self.entries) or 1
        out = {}
        for kind in ("sq", "vq"):
            es = [e for e in self.entries if e.kind == kind]
            out[kind] = {"tensors": len(es), "params": sum(e.numel for e in es),
                         "tensor_share": len(es) / n_t, "param_share": sum(e.numel for e in es) / n_p}
        return out

    def to_json(self) -> str:
        doc = {"format": PLAN_FORMAT, "policy": self.policy,
               "weights": {e.name: {"shape": list(e.shape), "algorithm": e.algorithm,
                                    "config": json.loads(e.config.to_json()), "reasons": e.reasons}
                           for e in self.entries},
               "elementwise": {k: json.loads(c.to_json()) for k, c in self.elementwise.items()}}
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        """Parse a plan; any malformed part is a one-line ConfigError."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{source}: not a quantization plan (expected \"format\": \"{PLAN_FORMAT}\")")
        entries = []
        try:
            for name, w in doc["weights"].items():
                cfg = _config(w["config"], source, name)
                alg = w["algorithm"]
                if ALGORITHM_CONFIG.get(alg) is not type(cfg):
                    raise ConfigError(f"{source}: {name}: algorithm '{alg}' does not take a {type(cfg).__name__}")
                entries.append(PlanEntry(name, tuple(int(x) for x in w["shape"]), alg, cfg, w.get("reasons", {})))
            elementwise = {k: _config(v, source, k) for k, v in doc.get("elementwise", {}).items()}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed plan ({type(exc).__name__}: {exc})") from None
        return cls(tuple(entries), elementwise, doc.get("policy", {}))


def _config(d: dict, source: str, name: str) -> ConfigBase:
    kind = CONFIG_TYPES.get(d.get("type", ""))
    if kind is None:
        raise ConfigError(f"{source}: {name}: unknown config type {d.get('type')!r}")
    return kind.from_dict(d)
