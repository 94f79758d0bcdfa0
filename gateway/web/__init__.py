"""The gateway's one ASGI application (Starlette) and its server (uvicorn, in a thread):
``/metrics``, ``/healthz`` and the export API with its tokens, roles and sites."""
