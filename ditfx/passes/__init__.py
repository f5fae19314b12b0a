"""ditfx.passes"""
