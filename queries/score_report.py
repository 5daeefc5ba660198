"""What a ``score`` run computed, with what parameters, and how long it took (``ScoreReport``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from clip_density_index.queries.accuracy import CheckResult
from clip_density_index.queries.score_params import TARGET_OVERLAP, TARGET_SPEARMAN, ScoreParams


@dataclass
class ScoreReport:
    """What a ``score`` run computed, with what parameters, and how long it took."""

    run_id: int
    path: Path
    columns: list[str]
    n: int
    exact: bool
    estimator: str | None  # exact | strata | mimps | paper; None: no KL column
    reason: str  # why this estimator (auto's choice, or "asked for")
    precision: str | None  # score precision of exact work (exact, paper, the check)
    sides: tuple[str, ...]
    k: int | None
    m: int | None
    logit_scale: float
    logit_bias: float | None
    seed: int
    nprobe: dict[str, int | None] = field(default_factory=dict)  # per side: lists probed
    index_keys: dict[str, str] = field(default_factory=dict)  # per side: FAISS key searched
    rescored: dict[str, bool] = field(default_factory=dict)  # per side: neighbours rescored
    dots_per_query: dict[str, float | None] = field(default_factory=dict)  # per side; None: not counted
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    chunks_computed: int = 0
    chunks_reused: int = 0
    checks: list[CheckResult] = field(default_factory=list)
    targets: tuple[float, float] = (TARGET_SPEARMAN, TARGET_OVERLAP)  # (Spearman, top-25% overlap)
    details: dict[str, dict] = field(default_factory=dict)  # per side: the estimator's own figures
    engine: str = "local"  # where the KL chunks ran (indexer.engine)

    @classmethod
    def start(cls, pool, p: ScoreParams, engine: str = "local") -> "ScoreReport":
        """An empty report of a run with parameters ``p`` on ``pool``."""
        return cls(run_id=0, path=pool.root, columns=p.columns, n=pool.n, exact=p.exact,
                   estimator=p.estimator if p.kl else None, reason=p.reason if p.kl else "",
                   precision=p.precision if p.kl and p.estimator in ("exact", "paper") else None,
                   sides=p.sides, k=p.k, m=p.m, logit_scale=p.a, logit_bias=p.b, seed=p.seed, targets=p.targets,
                   engine=engine)

    @property
    def targets_met(self) -> bool | None:
        """Whether every checked column met the targets; None without a check."""
        return all(c.meets(*self.targets) for c in self.checks) if self.checks else None

    @property
    def total_seconds(self) -> float:
        return self.seconds.get("total", sum(self.seconds.values()))

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def report_dict(report: ScoreReport) -> dict:
    """A JSON-able dict of a report (for the CLI's output)."""
    d = asdict(report)
    d["path"] = str(report.path)
    return d
