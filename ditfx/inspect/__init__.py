"""Graph inspection: region maps, costs, pass reports and plans."""
from ditfx.inspect.report import format_dot, format_text, inspect_model

__all__ = ["format_dot", "format_text", "inspect_model"]
