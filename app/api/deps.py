"""`Annotated` aliases so routes read like prose: `pipeline: PipelineDep`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.config import Settings
from app.delivery.pipeline import Pipeline


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


def get_verifier(request: Request) -> Any:
    """The OIDC verifier when EVENT_AUTH=oidc, else None (typed loosely: imported lazily)."""
    return request.app.state.verifier


SettingsDep = Annotated[Settings, Depends(get_settings)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
VerifierDep = Annotated[Any, Depends(get_verifier)]
