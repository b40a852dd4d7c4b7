"""Inference worker: OpenAI-compatible HTTP in front of a continuously batching,
tenant-fair scheduler over an ONNX Runtime decoder, measuring every request.

Module map: ``config`` (what the agent writes), ``model`` (reading an Optimum-layout
model directory), ``runtime`` (ONNX Runtime sessions), ``kvcache`` (batched KV state),
``sampling``, ``grammar`` (structured output's constrained decoding), ``engine`` (one
prefill or decode step over a batch), ``scheduler`` (admission, fairness, the asyncio
batching loop), ``metrics`` (latency definitions, Prometheus, sketches and SLO
counters), ``tokenizer``, ``protocol`` (OpenAI request, response and error shapes),
``server`` (ASGI app), ``synthetic`` (writes a small random model for machines without
a real one).
"""
