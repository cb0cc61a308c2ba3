"""Export: best checkpoints -> TorchScript + ONNX with proven parity -> model_store/xray.mar.

    python -m export            # artifacts/best -> artifacts/export (+ parity.json, predictions_*.json)
    python -m export.archive    # artifacts/export/xraynet.onnx -> model_store/xray.mar

Both formats carry the checkpoint's ModelCard (handlers.backends.CARD_KEY) with the checkpoint's
sha256 and the library versions that wrote them; handlers.backends.load_runner reads it back.
"""
