"""A rules file (NOTIFY_RULES) made a router: match (pure, indexed), then render, then build the
notification. Without a rules file, app/rules/default.py routes.

A recipient hears about a storage change at most once: a route reached through `continue: true`
sends only to recipients no earlier matching route served. Each (route, change) has its own key,
`route:<name>:<change key>`, so two routes never share a claim.

A route with a `digest` or a `rate` (issue 11) is `Deferred`: the pipeline decides, with the
digest store, whether the event goes out now or waits for the route's digest. Its recipients count
as served either way (the event reaches them, now or in the digest), and a digest goes to the
route's whole `to` list: one email per window.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.events.models import StorageEvent
from app.notify.base import Notification
from app.notify.render import VERBS, Rendered, render
from app.rules.base import Deferred, DigestRoute, RateLimit, Routed, Unrouted
from app.rules.match import Matcher, describe
from app.rules.model import RouteSpec, Rules, RulesError, load_rules
from app.rules.templates import (
    DigestTemplates,
    RouteTemplates,
    TemplateProblem,
    compile_digest_templates,
    compile_route_templates,
    footer,
    sample_event,
    with_footer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    spec: RouteSpec
    templates: RouteTemplates  # for one event (a digest route's lone leading email: none)
    footer: str  # the line every email of this route ends with
    digest_templates: DigestTemplates | None = None  # a digest route's own, for its windows


class RulesRouter:
    def __init__(self, rules: Rules, routes: Mapping[str, CompiledRoute], sender: str) -> None:
        self.rules = rules
        self.matcher = Matcher(rules.routes)
        self.routes = routes
        self.sender = sender
        self._digest_routes = {
            spec.name: digest_route(spec, routes[spec.name].digest_templates)
            for spec in rules.routes
            if spec.digest is not None or spec.rate is not None
        }

    @property
    def size(self) -> int:
        return len(self.rules.routes)

    def digest_routes(self) -> Mapping[str, DigestRoute]:
        return self._digest_routes

    def route(self, event: StorageEvent) -> Routed:
        selected = self.matcher.select(event)
        if not selected:
            return Routed([], Unrouted.NO_ROUTE)
        served: set[str] = set()
        notifications: list[Notification] = []
        deferred: list[Deferred] = []
        default = None
        for spec in selected:
            if spec.drop:
                if not notifications and not deferred:
                    return Routed([], Unrouted.DROPPED, spec.name)
                break  # a drop route ends the search; earlier routes still send
            recipients = _unserved(spec.to, served)
            if not recipients:
                continue  # everyone here has been served by an earlier route
            compiled = self.routes[spec.name]
            if spec.digest is not None or spec.rate is not None:
                build = functools.partial(self._notification, event, compiled, recipients, None)
                deferred.append(Deferred(spec.name, build, rate=spec.rate is not None))
                continue
            default = default or render(event, VERBS[event.type])
            notifications.append(self._notification(event, compiled, recipients, default))
        if not notifications and not deferred:
            return Routed([], Unrouted.NO_ROUTE)
        return Routed(notifications, deferred=tuple(deferred))

    def _notification(
        self,
        event: StorageEvent,
        compiled: CompiledRoute,
        recipients: tuple[str, ...],
        default: Rendered | None,
    ) -> Notification:
        name = compiled.spec.name
        default = default or render(event, VERBS[event.type])
        rendered = with_footer(compiled.templates.render(event, name, default), compiled.footer)
        return Notification(
            key=f"route:{name}:{event.change_key()}",
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            recipients=recipients,
            sender=self.sender,
            context={**event.log_fields(), "route": name},
        )


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


def digest_route(spec: RouteSpec, templates: DigestTemplates | None) -> DigestRoute:
    """What a flush needs to know of a `digest` or `rate` route."""
    if spec.digest is not None:
        return DigestRoute(
            name=spec.name,
            recipients=spec.to,
            window_seconds=spec.digest.window_seconds,
            max_items=spec.digest.max_items,
            leading=spec.digest.leading,
            templates=templates,
        )
    if spec.rate is None:
        raise ValueError(f"route {spec.name!r} has neither a digest nor a rate")
    return DigestRoute(
        name=spec.name,
        recipients=spec.to,
        window_seconds=spec.rate.per_seconds,
        max_items=RATE_DIGEST_ITEMS,
        rate=RateLimit(spec.rate.max, spec.rate.per_seconds),
    )


RATE_DIGEST_ITEMS = 100  # objects a rate route's overflow digest lists by name


def compile_rules(rules: Rules) -> dict[str, CompiledRoute]:
    """Each route's templates, checked by rendering a sample event (a sample window for a
    digest route); RulesError on a problem, naming the file line of the template's line."""
    compiled = {}
    for spec in rules.routes:
        digest = spec.digest is not None
        compiled[spec.name] = CompiledRoute(
            spec=spec,
            templates=RouteTemplates() if digest else _templates(rules.path, spec),
            footer=footer(spec.name, describe(spec)),
            digest_templates=_digest_templates(rules.path, spec) if digest else None,
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
        raise _template_error(path, spec, problem) from None


def _digest_templates(path: str, spec: RouteSpec) -> DigestTemplates | None:
    if spec.subject is None and spec.text is None and spec.html is None:
        return None
    try:
        return compile_digest_templates(spec.subject, spec.text, spec.html)
    except TemplateProblem as problem:
        raise _template_error(path, spec, problem) from None


def _template_error(path: str, spec: RouteSpec, problem: TemplateProblem) -> RulesError:
    first = spec.template_lines.get(problem.field)
    line = first if first is None or problem.line is None else first + problem.line - 1
    return RulesError(path, line, spec.name, problem.field, problem.message)


def load_router(path: Path, sender: str) -> RulesRouter:
    """Read, validate and compile a rules file; RulesError names the file, line, route and field."""
    rules = load_rules(path)
    return RulesRouter(rules, compile_rules(rules), sender)
