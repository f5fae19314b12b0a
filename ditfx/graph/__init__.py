"""ditfx.graph"""
