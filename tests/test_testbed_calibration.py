"""The testbed's calibration on fabricated measurements (vLLM's way: no processes, no devices):
each constant lands in its own field, the set-up's round trips are fitted where links' RTTs spread
and the default where they do not, runs are pooled, and the simulator is handed the runtime
profile ×K."""

from __future__ import annotations

import pytest

from blockswarm.core.errors import ConfigError
from blockswarm.perf.scenario import load_scenario
from blockswarm.testbed.calibration import OPEN_RTTS, Calibration, Measured, SetupSample, StepBreakdown, calibrate
from blockswarm.testbed.run import TestbedSettings as Settings  # (not a test class)


def _measured(setups, wire_hop_s=0.002):
    breakdowns = [StepBreakdown(wire_hop_s=wire_hop_s, wire_prefill_hop_s=0.004, server_hop_s=0.001,
                                host_block_s=0.0005, client_step_s=0.0007, hops=2)] * len(setups)
    return Measured(records=[], breakdowns=breakdowns, setup_samples=setups)


def _setup(coordinator_rtt, hop_rtts, asking=0.010, per_hop=0.001, rtts=4.0, held=0.0):
    """A request's set-up as the runtime spends it: the route's question (a new connection: `rtts`
    round trips to the coordinator, `asking` beside, `held` if the coordinator held it), then each
    hop opened (`rtts` round trips to its server, `per_hop` beside)."""
    opens = tuple((per_hop + rtts * rtt, rtt) for rtt in hop_rtts)
    total = asking + held + rtts * coordinator_rtt + sum(t for t, _ in opens)
    return SetupSample(total, coordinator_rtt, opens)


def test_each_constant_lands_in_its_field_and_the_round_trips_are_fitted_when_rtts_spread():
    samples = [_setup(0.05, [0.0025, 0.05]), _setup(0.0025, [0.05, 0.10, 0.0025]), _setup(0.10, [0.15]),
               _setup(0.05, [0.10, 0.0025], held=0.8)]  # one request the coordinator held
    constants = calibrate([_measured(samples)])
    assert (constants.decode_hop_s, constants.prefill_hop_s) == (0.002, 0.004)
    assert (constants.host_block_s, constants.client_step_s) == (0.0005, 0.0007)
    assert constants.open_rtts == pytest.approx(4.0) and constants.open_hop_s == pytest.approx(0.001)
    assert constants.setup_s == pytest.approx(0.010)  # a median: the held request is waiting, not set-up


def test_without_spread_in_rtts_the_protocols_round_trips_are_assumed():
    samples = [_setup(0.05, [0.05, 0.05], rtts=OPEN_RTTS, asking=0.02 + e) for e in (0.0, 0.001, 0.5)]
    constants = calibrate([_measured(samples)])
    assert constants.open_rtts == OPEN_RTTS and constants.open_hop_s == pytest.approx(0.001)
    assert constants.setup_s == pytest.approx(0.021)


def test_the_machines_busy_share_is_measured_between_two_readings():
    from blockswarm.testbed.run import busy_between, cpu_ticks

    assert busy_between((10, 100), (60, 200)) == 0.5
    assert busy_between(None, (60, 200)) is None and busy_between((10, 100), (10, 100)) is None
    busy, total = cpu_ticks()  # this machine's, since boot
    assert 0 <= busy <= total


def test_runs_are_pooled():
    a = _measured([_setup(0.05, [0.0025, 0.05])], wire_hop_s=0.002)
    b = _measured([_setup(0.10, [0.15, 0.0025])] * 3, wire_hop_s=0.004)
    assert calibrate([a, b]).decode_hop_s == pytest.approx((0.002 + 3 * 0.004) / 4)  # a mean over requests


def test_the_simulator_gets_the_runtime_profile_with_the_constants_times_k():
    scenario = load_scenario("scenarios/testbed/clustered-9.yaml")
    constants = calibrate([_measured([_setup(0.05, [0.05], rtts=OPEN_RTTS)] * 3)])
    predicted = constants.scenario(scenario, 2.0, "cluster0")
    assert predicted.behaviour.hop_level and predicted.behaviour.profile == "runtime"
    assert predicted.behaviour.host_block_s == pytest.approx(0.001)
    assert predicted.behaviour.client_step_s == pytest.approx(0.0014)
    assert predicted.behaviour.open_rtts == OPEN_RTTS  # a count of round trips: not scaled
    assert predicted.behaviour.open_hop_s == pytest.approx(0.002)
    assert predicted.behaviour.coordinator == "cluster0"
    assert predicted.network.decode_overhead_s == pytest.approx(0.004)
    assert predicted.network.setup_s == pytest.approx(2 * 0.010)
    assert predicted.network.prefill_s_per_token == 0.0


def test_every_shipped_scenario_is_calibrated_on_another_one_and_a_calibration_round_trips_json(tmp_path):
    from pathlib import Path

    for path in sorted(Path("scenarios/testbed").glob("*.yaml")):
        settings = Settings.of(path)
        assert settings.calibration and Path(settings.calibration).resolve() != path.resolve()
        load_scenario(settings.calibration)
    calibration = Calibration(calibrate([_measured([_setup(0.05, [0.05])])]), "x.yaml", 1001, ("petals",), {})
    assert Calibration.from_json({"calibration": calibration.to_json()}) == calibration
    assert Calibration.from_json({"calibrations": [calibration.to_json()]}) == calibration
    with pytest.raises(ConfigError, match="not a testbed calibration"):
        Calibration.from_json({"policies": {}})
    bad = tmp_path / "s.yaml"
    bad.write_text("testbed: {calibration: nowhere.yaml}\n")
    with pytest.raises(ConfigError, match="testbed.calibration"):
        Settings.of(bad)
