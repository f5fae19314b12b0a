"""ditfx.runtime"""
