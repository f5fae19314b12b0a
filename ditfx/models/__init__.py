"""ditfx.models"""
