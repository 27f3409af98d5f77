"""Performance model: per-block times, network costs, predicted TTFT and per-token time."""
