"""`clipforge serve`: zero-shot labels, search and embeddings over HTTP, with a page to try them.

`app.create_app` builds the FastAPI app over a loaded model (and optionally a search index), `app.load_app`
loads both first; `limits.Limits` holds what one request may ask. Nothing is imported here, so the CLI can
read the limits without loading the web framework. See docs/serving.md.
"""
