"""Batch scoring of image collections (``catsdogs predict-batch``).

* :mod:`~catsdogs.batch.collection` — the images of a folder tree or a zip archive, read by name.
* :mod:`~catsdogs.batch.scoring` — one chunk of images through the bundle's preprocessing and graph:
  the code both engines run, so they give the same answers.
* :mod:`~catsdogs.batch.local_engine` — the default engine: decode threads and batched ORT calls.
* :mod:`~catsdogs.batch.ray_engine` — the same scoring on Ray Data (the optional ``.[ray]`` extra).
* :mod:`~catsdogs.batch.output` — the results as CSV or JSON lines, written atomically.
* :mod:`~catsdogs.batch.predict` — :func:`predict_batch`: resolve the model, pick an engine, write.
"""
