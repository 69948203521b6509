from .pipeline_afm import AFMPipeline

__all__ = ["AFMPipeline"]
