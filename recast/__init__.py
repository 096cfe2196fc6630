"""Recast's public Python surface for programs that talk to a running service (``recast.client``)."""

from recast.client import ApiError, Client, Event, Job

__all__ = ["ApiError", "Client", "Event", "Job"]
