"""Serving: the durable job queue (:mod:`.jobs`), its workers (:mod:`.worker`), the HTTP API (:mod:`.api`)
and the web UI (:mod:`.ui`). ``hunyuan-i2v serve`` and ``hunyuan-i2v ui`` start them."""

from .jobs import Job, JobStore
from .settings import Limits, ServerSettings

__all__ = ["Job", "JobStore", "Limits", "ServerSettings"]
