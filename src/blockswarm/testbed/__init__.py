"""The testbed: real swarms on an emulated wide-area network with emulated devices, and the
simulator's error measured against them. It may import `runtime`, `sim` and `planner`; only the
CLI (and the benchmark) import it."""
