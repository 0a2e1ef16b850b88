"""Method configurations: frozen dataclasses that validate with a user error and round-trip to JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ConfigBase:
    def to_json(self) -> str:
        return json.dumps({"type": type(self).__name__, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ConfigBase":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"type"}
        _check(not unknown, f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ScalarConfig(ConfigBase):
    """Round-to-nearest per-group affine quantization (RTN); base of GPTQ and AWQ.

    group_size 0 means one group per output channel (per-channel). Asymmetric
    (min-max) groups by default, as the authors ran GPTQ.

    Bit accounting (`bpw`, what the payload stores): every weight costs `bits`
    bits of code; every group costs a float16 scale (16 bits) plus, when
    asymmetric, an integer zero point of `bits` bits (it lies in
    [0, 2**bits)); symmetric groups store no zero point. With the default
    3 bits and groups of 128: 3 + (16 + 3) / 128 = 3.1484 bpw.

    `paper_bpw` is the accounting the RWKVQuant paper uses for its "3.25 bpw"
    3-bit GPTQ: 32 bits of scale and zero point per group (a float16 scale and
    a float16 zero, as the authors' GPTQ keeps them), so 3 bits in groups of
    128 cost 3 + 32 / 128 = 3.25. It is never below `bpw`.
    """

    bits: int = 3
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check(self.bits in (2, 3, 4, 8), f"bits must be 2, 3, 4 or 8, got {self.bits}")
        _check(self.group_size == 0 or 8 <= self.group_size <= 4096,
               f"group_size must be 0 (per channel) or 8..4096, got {self.group_size}")

    def effective_group(self, k: int) -> int:
        return k if self.group_size == 0 else min(self.group_size, k)

    def _groups(self, n: int, k: int) -> int:
        return n * -(-k // self.effective_group(k))

    def bpw(self, n: int, k: int) -> float:
        """Stored bits per weight of an [n, k] weight: codes + fp16 scales + `bits`-bit zero points."""
        return (n * k * self.bits + self._groups(n, k) * (16 + (0 if self.symmetric else self.bits))) / (n * k)

    def paper_bpw(self, n: int, k: int) -> float:
        """The paper's accounting: codes + 16-bit scale + 16-bit zero point per group (no zero if symmetric)."""
        return (n * k * self.bits + self._groups(n, k) * (16 if self.symmetric else 32)) / (n * k)


@dataclass(frozen=True)
class GPTQConfig(ScalarConfig):
    """GPTQ: Hessian-aware rounding with error feedback (Frantar et al. 2022)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False  # the authors ran GPTQ without act-order

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.damp < 1, f"damp must be in [0, 1), got {self.damp}")
        _check(self.block_size >= 1, "block_size must be >= 1")


@dataclass(frozen=True)
class AWQConfig(ScalarConfig):
    """AWQ-style per-input-channel scaling (s = act_rms**alpha, alpha searched) before RTN."""

    grid: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.grid >= 1, "grid must be >= 1")


@dataclass(frozen=True)
class VQConfig(ConfigBase):
    """Vector quantization (k-means VQ, GPTVQ): `dim` consecutive weights share one codebook index.

    bits is per weight, so a codebook has 2**(bits*dim) entries; one codebook
    (entries of codebook_bits bits + one fp16 scale) per block of group_rows
    rows x group_cols columns.

    Bit accounting (`bpw`, what the payload stores): `bits` per weight of
    index, plus per codebook 2**(bits*dim) * dim entries of codebook_bits bits
    and one 16-bit scale. The paper's accounting is the same (`paper_bpw`).
    `rows_for_bpw` gives the block height that holds a weight at a cost cap
    (the paper holds VQ at 3.5 bpw).
    """

    bits: int = 3
    dim: int = 2
    group_rows: int = 16
    group_cols: int = 256
    kmeans_iters: int = 25
    codebook_bits: int = 8
    init: str = "mahalanobis"
    m_step: bool = True
    hessian_weighted: bool = True
    damp: float = 0.01
    block_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.dim in (1, 2, 4), f"dim must be 1, 2 or 4, got {self.dim}")
        _check(1 <= self.bits * self.dim <= 12, "bits*dim must be 1..12 (codebook of at most 4096 entries)")
        _check(self.group_rows >= 1 and self.group_cols >= self.dim and self.group_cols % self.dim == 0,
               "group_cols must be a multiple of dim and group_rows >= 1")
        _check(self.codebook_bits in (4, 8, 16), "codebook_bits must be 4, 8 or 16")
        _check(self.init in ("mahalanobis", "kpp"), f"init must be 'mahalanobis' or 'kpp', got {self.init!r}")
        _check(self.kmeans_iters >= 0, "kmeans_iters must be >= 0")

    @property
    def entries(self) -> int:
        return 1 << (self.bits * self.dim)

    @property
    def codebook_cost(self) -> int:
        """Bits of one codebook: its entries and its fp16 scale."""
        return self.entries * self.dim * self.codebook_bits + 16

    def bpw(self, n: int, k: int) -> float:
        """Stored bits per weight of an [n, k] weight: indices + codebooks (entries and scales)."""
        return self.bpw_with_rows(n, k, self.group_rows)

    def bpw_with_rows(self, n: int, k: int, rows: int) -> float:
        books = -(-n // rows) * -(-k // min(self.group_cols, k))
        return (n * k * self.bits + books * self.codebook_cost) / (n * k)

    def paper_bpw(self, n: int, k: int) -> float:
        return self.bpw(n, k)

    def rows_for_bpw(self, n: int, k: int, max_bpw: float) -> int | None:
        """The fewest rows per codebook block whose cost stays at or below `max_bpw` (None: not even one
        codebook per column group fits)."""
        for rows in range(1, n + 1):
            if self.bpw_with_rows(n, k, rows) <= max_bpw + 1e-12:
                return rows
        return None


@dataclass(frozen=True)
class ElementwiseConfig(ConfigBase):
    """Codebook for element-wise multiplication vectors, weighted by mean squared activation."""

    bits: int = 4
    percentile: float = 99.0
    weighted: bool = True
    iters: int = 100

    def __post_init__(self) -> None:
        _check(1 <= self.bits <= 8, f"element-wise bits must be 1..8, got {self.bits}")
        _check(0 < self.percentile <= 100, f"percentile must be in (0, 100], got {self.percentile}")
