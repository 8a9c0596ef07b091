"""``qlora serve``: an OpenAI-compatible HTTP server for a model and its adapters.

Needs the ``serve`` extra (``pip install 'qlora[serve]'``: FastAPI and uvicorn);
nothing else in qlora imports this package.
"""
