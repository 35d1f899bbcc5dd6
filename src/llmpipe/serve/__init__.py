"""Serving: engine launchers (llama.cpp server on CPU, vLLM on GPU), the OpenAI-compatible
canary router, canary analysis, deployment state and Prometheus metrics."""
