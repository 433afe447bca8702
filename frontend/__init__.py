"""Frontend: ModelSpec -> the DeepSeek-V4 step function -> torch.export graphs (prefill and decode)."""
