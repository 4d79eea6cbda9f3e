"""The endpoint a user would write in ten minutes (the peer of benchmarks/bench_peers.py): a sync
FastAPI route, Pillow decode, squash resize, one ONNX Runtime call. No tuning, on purpose.

    BUNDLE=path/to/bundle uvicorn naive_fastapi:app --port 8001
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, UploadFile
from PIL import Image

BUNDLE = os.environ["BUNDLE"]
session = ort.InferenceSession(f"{BUNDLE}/model.onnx")
prep = json.loads(Path(BUNDLE, "preprocessing.json").read_text())
app = FastAPI()


@app.post("/predict")
def predict(file: UploadFile) -> dict:
    image = Image.open(io.BytesIO(file.file.read())).convert("RGB").resize((prep["image_size"],) * 2)
    x = (np.asarray(image, np.float32) / 255 - prep["mean"]) / prep["std"]
    logits = session.run(None, {"input": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return {"label": prep["class_names"][int(probs.argmax())], "confidence": float(probs.max())}
