"""`captrain serve`: an HTTP server reading captchas with an exported model
(FastAPI, uvicorn, onnxruntime; no torch for an exported folder)."""
