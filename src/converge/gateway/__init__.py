"""The data path: OpenAI-compatible /v1 and Open Inference /v2, in front of model replicas."""
