"""ditfx.kernels"""
