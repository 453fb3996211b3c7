"""The guided sampler: cross-attention capture, the schedule, the run spec and the denoising loop."""
