"""The front door: an OpenAI-compatible HTTP API over a swarm, and a live page of the swarm.

`blockswarm api` serves `/v1/models`, `/v1/chat/completions` and `/v1/completions` (streaming by
server-sent events, as OpenAI does) and the swarm page at `/`, whose data is `/api/swarm` (and
`/api/swarm/events`, the same as a stream). Only the CLI imports this package; it imports the
runtime, never the other way round.
"""
