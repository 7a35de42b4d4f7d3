"""An OpenAI-compatible HTTP server over any stage's engine (M2 on).

`python -m serve --stage m7 --model default --port 8000` serves one stage's `LLMEngine`
through its public API alone (`add_request`, `step`, `abort_request`), so no stage
changes for it. `engine_loop.py` runs the engine's step loop on a thread of its own and
hands each request's outputs to the asyncio event loop; `protocol.py` turns OpenAI
request bodies into sampling parameters and outputs into response bodies; `app.py` is
the FastAPI application; `__main__.py` the command line.

Introduced after M7 (issue 25).
"""
