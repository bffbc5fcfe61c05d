"""smallmind.generation - text generation and serving: Sampling (KV-cache decoding in C),
SamplerPool and ThrottledInferenceService (sharing one model between threads and asyncio), and the
HTTP server (`server`, needs the `serve` extra)."""
