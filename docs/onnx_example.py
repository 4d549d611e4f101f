"""Run a model from `tlearn export` with onnxruntime, numpy and Pillow only.
Usage: python onnx_example.py model.onnx image.jpg [...]"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1])
meta = session.get_modelmeta().custom_metadata_map
pre, classes = json.loads(meta["tlearn.preprocess"]), json.loads(meta["tlearn.classes"])
names = [o.name for o in session.get_outputs()]  # "scores" (+ "probabilities")
for path in sys.argv[2:]:
    img = Image.open(path)
    img.draft("RGB", (pre["decode"]["jpeg_draft_min_size"],) * 2)  # as tlearn decodes JPEGs
    img = ImageOps.exif_transpose(img).convert("RGB")
    (short,), (ch, cw), (w, h) = pre["resize"], pre["crop"], img.size  # resize: shorter side
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, getattr(Image.Resampling, pre["interpolation"].upper()))
    left, top = round((img.width - cw) / 2), round((img.height - ch) / 2)
    x = np.asarray(img.crop((left, top, left + cw, top + ch)), dtype=np.uint8)[None]
    out = dict(zip(names, session.run(None, {"images": x}), strict=True))
    scores = out.get("probabilities", out["scores"])[0]
    print(path, classes[int(scores.argmax())], " ".join(f"{v:.7f}" for v in scores))
