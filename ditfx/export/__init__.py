"""ditfx.export"""
