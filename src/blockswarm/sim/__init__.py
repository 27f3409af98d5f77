"""Discrete-event simulator of a swarm, running the planner's policies."""
