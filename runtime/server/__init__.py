"""`sdrt serve`: an HTTP server speaking AUTOMATIC1111's `/sdapi/v1` API, with a kiosk web page.

FastAPI + uvicorn; generation runs in worker threads behind a bounded job queue
(`server.jobs`), so the event loop keeps answering health and progress checks. Needs the
`serve` extra: `pip install 'sdrt[serve]'`.
"""
