from .export import export_standalone, is_standalone
from .pipeline_afm import AFMPipeline, class_grid

__all__ = ["AFMPipeline", "class_grid", "export_standalone", "is_standalone"]
