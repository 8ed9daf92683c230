"""The serving room: an OpenAI-compatible HTTP server over the engine, many LoRA adapters on one base model.

    rft serve --adapters adapters/ --port 8000

  app.py       rft serve: the FastAPI app and its endpoints (FastAPI / uvicorn imported only there and in routers)
  requests.py  request bodies checked and turned into engine requests, and their text, apart from HTTP
  worker.py    the engine thread, the adapter directory, metrics
  traffic.py   the opt-in request log's rows and POST /v1/feedback (an APIRouter the app includes)

This file imports nothing, so the HTTP-free layers load without the app.
"""
