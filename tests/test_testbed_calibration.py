"""The testbed's calibration on fabricated measurements (vLLM's way: no processes, no devices):
each constant lands in its own field, the set-up slope is fitted where routes' RTTs spread and
the default where they do not, and the simulator is handed the runtime profile ×K."""

from __future__ import annotations

import pytest

from blockswarm.perf.scenario import load_scenario
from blockswarm.testbed.run import OPEN_RTTS, Measured, StepBreakdown, calibrate


def _measured(setups):
    breakdowns = [StepBreakdown(wire_hop_s=0.002, wire_prefill_hop_s=0.004, server_hop_s=0.001, host_block_s=0.0005,
                                client_step_s=0.0007, hops=2)] * len(setups)
    return Measured(records=[], breakdowns=breakdowns, setup_samples=setups)


def test_each_constant_lands_in_its_field_and_the_set_up_slope_is_fitted_when_rtts_spread():
    # set-up = 20 ms + 4 round trips per hop, over routes whose RTT sums are 50, 100 and 150 ms
    constants = calibrate(_measured([(0.020 + 4 * r, r) for r in (0.05, 0.10, 0.15, 0.10)]))
    assert (constants.decode_hop_s, constants.prefill_hop_s) == (0.002, 0.004)
    assert (constants.host_block_s, constants.client_step_s) == (0.0005, 0.0007)
    assert constants.open_rtts == pytest.approx(4.0) and constants.setup_s == pytest.approx(0.020)
    # every route with the same RTTs: nothing to fit a slope on, the protocol's three round trips
    same = calibrate(_measured([(0.020 + 3 * 0.1 + e, 0.1) for e in (0.0, 0.001, 0.5)]))
    assert same.open_rtts == OPEN_RTTS and same.setup_s == pytest.approx(0.021)  # a median: one held request


def test_the_simulator_gets_the_runtime_profile_with_the_constants_times_k():
    scenario = load_scenario("scenarios/testbed/clustered-9.yaml")
    constants = calibrate(_measured([(0.3, 0.1)] * 3))
    predicted = constants.scenario(scenario, 2.0)
    assert predicted.behaviour.hop_level and predicted.behaviour.profile == "runtime"
    assert predicted.behaviour.host_block_s == pytest.approx(0.001)
    assert predicted.behaviour.client_step_s == pytest.approx(0.0014)
    assert predicted.behaviour.open_rtts == OPEN_RTTS  # a count of round trips: not scaled
    assert predicted.network.decode_overhead_s == pytest.approx(0.004)
    assert predicted.network.setup_s == pytest.approx(2 * (0.3 - 3 * 0.1))
    assert predicted.network.prefill_s_per_token == 0.0
