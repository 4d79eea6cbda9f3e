"""The inference service: FastAPI on ONNX Runtime, importing only what ``.[serve]`` installs.

Start it with ``catsdogs serve`` (:func:`catsdogs.serve.server.serve`); build it in tests with
:func:`catsdogs.serve.app.create_app`.
"""
