"""The data plane's OpenAI gateway: predicted-TTFT routing, fleet-wide tenant fairness and
limits, SLO-aware admission, and latency measured as clients see it."""
