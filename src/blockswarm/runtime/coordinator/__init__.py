"""The coordinator: admits servers, places their blocks with the planner's placement policy, hands
each session a route with the planner's routing policy, and keeps the swarm's state in SQLite.

`swarm.py` decides (no sockets: the benchmark and the tests drive it directly), `store.py`
persists, `service.py` is the ZeroMQ service around them. Torch-free: a coordinator never loads
a model.
"""
