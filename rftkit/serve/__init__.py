"""The serving room: an OpenAI-compatible HTTP server over the engine, many LoRA adapters on one base model.

    rft serve --adapters adapters/ --port 8000

  app.py       rft serve: the FastAPI app and its endpoints (the only module that imports FastAPI / uvicorn)
  requests.py  request bodies checked and turned into engine requests, and their text, apart from HTTP
  worker.py    the engine thread, the adapter directory, metrics

This file imports nothing, so the HTTP-free layers load without the app.
"""
