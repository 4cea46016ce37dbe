"""The engine: continuous batching of many users' requests over one model.

``llm_engine.Engine`` runs the loop (schedule -> run -> postprocess) on its own thread;
``scheduler`` decides who runs (pure bookkeeping) and claims adapter slots from
``adapter_slots`` (the adapter bank's memory manager: device slots over a host cache over the
store); ``model_runner`` turns a plan into forwards (``steps``: what one forward tells the
model) and owns the ``kv_cache``; ``sampler`` picks tokens for the whole batch (after the
penalties of ``logits`` and the token masks of ``grammar``); a ``sequence`` holds one request,
its ``sampling_params`` and its ``detokenizer`` state, and decides when it is done;
``background`` spaces fine-tuning units between steps.
"""

from server.engine.adapter_slots import SlotPool, SlotTicket
from server.engine.errors import (
    AdapterLoadTimeout,
    ContextTooLong,
    EngineError,
    EngineStopped,
    InvalidGrammar,
    InvalidTokens,
    QueueFull,
    SlotsExhausted,
)
from server.engine.llm_engine import Engine, EngineConfig
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.sequence import Event, Sequence

__all__ = [
    "AdapterLoadTimeout",
    "ContextTooLong",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStopped",
    "Event",
    "InvalidGrammar",
    "InvalidTokens",
    "QueueFull",
    "SamplingParams",
    "SchedulerConfig",
    "Sequence",
    "SlotPool",
    "SlotTicket",
    "SlotsExhausted",
]
