"""The version of ditfx, in a module of its own: the package's manifest records it without importing the facade."""
__version__ = "0.1.0"
