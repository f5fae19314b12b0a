"""ditfx.inspect"""
