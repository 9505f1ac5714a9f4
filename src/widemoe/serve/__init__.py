"""`widemoe serve`: an OpenAI-compatible server with continuous batching (FastAPI + uvicorn).

From the wire inwards:

- `server`: the server's state, uvicorn on a socket bound at once while the model loads in a thread
  (`/health` is 503 until then), and `serve_in_thread` for tests and `widemoe eval`;
- `app`: the endpoints (completions, chat, vLLM's tokenize/detokenize/tokenizer_info, metrics), SSE
  streaming, and every error in OpenAI's shape; `responses` builds the response bodies;
- `protocol`: request checks (400s naming the field); `model_files`: chat templates rendered as
  transformers renders them, and every EOS id of generation_config.json;
- `engine`: the thread that owns the model: admits waiting sequences, prefills them, runs one decode
  step over all running ones, samples each with its own generator (`sampling`), detokenizes
  incrementally (`detok`) and hands outputs to the HTTP side; `batch` holds the caches (one left-padded
  cache for all rows, or one per sequence for DeepSeek-V4).
"""
