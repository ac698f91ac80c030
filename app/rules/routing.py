"""A rules file (NOTIFY_RULES) made a router: match (pure, indexed), then render, then build the
notification. Without a rules file, app/rules/default.py routes.

A recipient hears about a storage change at most once: a route reached through `continue: true`
sends only to recipients no earlier matching route served. Each (route, change) has its own key,
`route:<name>:<change key>`, so two routes never share a claim.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.events.models import StorageEvent
from app.notify.base import Notification
from app.notify.render import VERBS, render
from app.rules.base import Routed, Unrouted
from app.rules.match import Matcher, describe
from app.rules.model import RouteSpec, Rules, RulesError, load_rules
from app.rules.templates import (
    RouteTemplates,
    TemplateProblem,
    compile_route_templates,
    footer,
    sample_event,
    with_footer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    spec: RouteSpec
    templates: RouteTemplates
    footer: str  # the line every email of this route ends with


class RulesRouter:
    def __init__(self, rules: Rules, routes: Mapping[str, CompiledRoute], sender: str) -> None:
        self.rules = rules
        self.matcher = Matcher(rules.routes)
        self.routes = routes
        self.sender = sender

    @property
    def size(self) -> int:
        return len(self.rules.routes)

    def route(self, event: StorageEvent) -> Routed:
        selected = self.matcher.select(event)
        if not selected:
            return Routed([], Unrouted.NO_ROUTE)
        served: set[str] = set()
        notifications: list[Notification] = []
        default = None
        for spec in selected:
            if spec.drop:
                if not notifications:
                    return Routed([], Unrouted.DROPPED, spec.name)
                break  # a drop route ends the search; earlier routes still send
            recipients = _unserved(spec.to, served)
            if not recipients:
                continue  # everyone here has been served by an earlier route
            compiled = self.routes[spec.name]
            default = default or render(event, VERBS[event.type])
            rendered = with_footer(
                compiled.templates.render(event, spec.name, default), compiled.footer
            )
            notifications.append(
                Notification(
                    key=f"route:{spec.name}:{event.change_key()}",
                    subject=rendered.subject,
                    text=rendered.text,
                    html=rendered.html,
                    recipients=recipients,
                    sender=self.sender,
                    context={**event.log_fields(), "route": spec.name},
                )
            )
        return Routed(notifications, None if notifications else Unrouted.NO_ROUTE)


def _unserved(addresses: tuple[str, ...], served: set[str]) -> tuple[str, ...]:
    """The addresses not yet served, each once, adding them to `served`. Addresses compare
    without case, as SendGrid does: it refuses a message naming one address twice."""
    unserved = []
    for address in addresses:
        folded = address.lower()
        if folded not in served:
            served.add(folded)
            unserved.append(address)
    return tuple(unserved)


def compile_rules(rules: Rules) -> dict[str, CompiledRoute]:
    """Each route's templates, checked by rendering a sample event; RulesError on a problem,
    naming the file line of the template's line."""
    compiled = {}
    for spec in rules.routes:
        compiled[spec.name] = CompiledRoute(
            spec=spec,
            templates=_templates(rules.path, spec),
            footer=footer(spec.name, describe(spec)),
        )
    return compiled


def _templates(path: str, spec: RouteSpec) -> RouteTemplates:
    if spec.subject is None and spec.text is None and spec.html is None:
        return RouteTemplates()
    # A route that requires metadata keys can use them in its templates: the sample has them.
    required = {key: "sample" for key, _ in spec.match.metadata or ()}
    try:
        return compile_route_templates(
            spec.subject, spec.text, spec.html, sample=sample_event(required or None)
        )
    except TemplateProblem as problem:
        first = spec.template_lines.get(problem.field)
        line = first if first is None or problem.line is None else first + problem.line - 1
        raise RulesError(path, line, spec.name, problem.field, problem.message) from None


def load_router(path: Path, sender: str) -> RulesRouter:
    """Read, validate and compile a rules file; RulesError names the file, line, route and field."""
    rules = load_rules(path)
    return RulesRouter(rules, compile_rules(rules), sender)
