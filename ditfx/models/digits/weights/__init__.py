"""Shipped files of the digits model (data only, loaded by ``ditfx.models.digits.shipped``).

model.safetensors, config.json, training.json, loss.png: the DiT (EMA weights), its training record.
classifier.safetensors, classifier.json: the metrics classifier and its held-out accuracy.
evaluation.json, samples.png: the measured sample quality and a 10x10 grid of samples.
"""
