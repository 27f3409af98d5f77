"""A tiny row-wise model builder over HiGHS (highspy), shared by the MILP and the routing ILP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np

INF = highspy.kHighsInf


@dataclass(frozen=True, slots=True)
class Solution:
    status: str  # HiGHS' model status, e.g. "Optimal", "Time limit reached"
    optimal: bool
    objective: float | None
    bound: float | None  # the proven lower bound
    gap: float | None  # relative MIP gap
    seconds: float
    values: np.ndarray | None


class Model:
    def __init__(self):
        self.cost, self.lower, self.upper, self.integer = [], [], [], []
        self.row_lower, self.row_upper, self.starts, self.index, self.value = [], [], [0], [], []

    def var(self, cost: float = 0.0, lower: float = 0.0, upper: float = INF, integer: bool = False) -> int:
        self.cost.append(cost)
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(integer)
        return len(self.cost) - 1

    def row(self, terms, lower: float = -INF, upper: float = INF) -> None:
        """lower ≤ Σ coef·x ≤ upper; terms is an iterable of (variable, coefficient)."""
        merged: dict[int, float] = {}
        for var, coef in terms:
            merged[var] = merged.get(var, 0.0) + coef
        for var, coef in merged.items():
            if coef:
                self.index.append(var)
                self.value.append(coef)
        self.starts.append(len(self.index))
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    def solve(self, time_limit_s: float = 60.0, mip_gap: float = 1e-6, threads: int = 1) -> Solution:
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.cost), len(self.row_lower)
        lp.col_cost_ = np.array(self.cost, dtype=float)
        lp.col_lower_ = np.array(self.lower, dtype=float)
        lp.col_upper_ = np.array(self.upper, dtype=float)
        lp.row_lower_ = np.array(self.row_lower, dtype=float)
        lp.row_upper_ = np.array(self.row_upper, dtype=float)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.array(self.starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(self.index, dtype=np.int32)
        lp.a_matrix_.value_ = np.array(self.value, dtype=float)
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in self.integer]
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        highs.setOptionValue("time_limit", float(time_limit_s))
        highs.setOptionValue("mip_rel_gap", float(mip_gap))
        highs.setOptionValue("threads", int(threads))
        highs.passModel(lp)
        begin = time.perf_counter()
        highs.run()
        seconds = time.perf_counter() - begin
        status = highs.getModelStatus()
        info = highs.getInfo()
        has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
        values = np.array(highs.getSolution().col_value) if has_solution else None
        mip = any(self.integer)
        return Solution(
            status=highs.modelStatusToString(status),
            optimal=status == highspy.HighsModelStatus.kOptimal,
            objective=info.objective_function_value if has_solution else None,
            bound=info.mip_dual_bound if mip else info.objective_function_value,
            gap=info.mip_gap if mip and has_solution else (0.0 if has_solution else None),
            seconds=seconds,
            values=values,
        )
