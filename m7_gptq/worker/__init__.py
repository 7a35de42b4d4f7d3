"""The worker: owns the device, the model and (from M1) the KV cache."""
