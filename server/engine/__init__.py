"""The engine: continuous batching of many users' requests over one model.

``llm_engine.Engine`` runs the loop (schedule -> run -> postprocess) on its own thread;
``scheduler`` decides who runs (pure bookkeeping), ``model_runner`` turns a plan into forwards
and owns the ``kv_cache``; ``sampler`` picks tokens for the whole batch; a ``sequence`` holds
one request, its ``sampling_params`` and its ``detokenizer`` state, and decides when it is done.
"""

from server.engine.llm_engine import (
    ContextTooLong,
    Engine,
    EngineConfig,
    EngineError,
    EngineStopped,
    QueueFull,
)
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Event, Sequence

__all__ = [
    "ContextTooLong",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStopped",
    "Event",
    "QueueFull",
    "SamplingParams",
    "SchedulerConfig",
    "Sequence",
]
