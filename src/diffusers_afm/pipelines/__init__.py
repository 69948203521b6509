from .pipeline_afm import AFMPipeline, class_grid

__all__ = ["AFMPipeline", "class_grid"]
