from .scheduling_flow_heun import FlowHeunScheduler, FlowHeunSchedulerOutput

__all__ = ["FlowHeunScheduler", "FlowHeunSchedulerOutput"]
