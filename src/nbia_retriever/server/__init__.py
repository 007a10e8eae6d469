"""A faithful, fault-injecting NBIA server for tests, benchmarks and the demo.

It serves a folder of DICOM files the way the real NBIA server does (reference sections
2 and 3: endpoints, wire shapes, streamed zips with data descriptors, OAuth tokens) and
breaks on purpose, deterministically, in the ways real servers break (see
:mod:`.faults`). Start one with :class:`ReferenceServer` or ``nbia-retriever serve``.
"""

from __future__ import annotations

from ..errors import ArchiveError, FaultSpecError
from .app import RequestRecord, format_manifest
from .cli import serve_command
from .config import CollectionConfig, ServerConfig, UserConfig, load_config
from .faults import Fault, FaultPlan, parse_rate
from .index import ArchiveIndex
from .runner import ReferenceServer, run_server

__all__ = [
    "ArchiveError",
    "ArchiveIndex",
    "CollectionConfig",
    "Fault",
    "FaultPlan",
    "FaultSpecError",
    "ReferenceServer",
    "RequestRecord",
    "ServerConfig",
    "UserConfig",
    "format_manifest",
    "load_config",
    "parse_rate",
    "run_server",
    "serve_command",
]
