"""`kimi-lora serve`: an OpenAI-compatible web layer over the inference engine (FastAPI + uvicorn, extra `serve`)."""
