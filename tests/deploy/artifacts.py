"""Readers for the deployment artifacts, shared by the tests beside this file.

Each reader follows the documented rules of the tool that consumes the file, only as far as this
repository's files need: the Dockerfile reference (instructions, line continuations, exec form),
the .dockerignore rules (last matching pattern wins, `!` re-includes, `**` spans folders), HCL via
python-hcl2, and Cloud Build's substitution syntax (`$VAR`, `${VAR}`, `$$` for a literal `$`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import yaml
from hcl2.utils import SerializationOptions

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TERRAFORM = ROOT / "eventarc.tf"
TERRAFORM_LOCK = ROOT / ".terraform.lock.hcl"
CLOUDBUILD = ROOT / "cloudbuild.yaml"

# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str  # the rest of the logical line, continuations joined

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/RUN, or None for the shell form."""
        if not self.arguments.startswith("["):
            return None
        value = json.loads(self.arguments)
        if not (isinstance(value, list) and all(isinstance(part, str) for part in value)):
            raise ValueError(f"{self.keyword}: exec form must be an array of strings")
        return value


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str
    from_stage: str | None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [each for each in self.instructions if each.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        """ENV values of this stage, later ones winning, `$VAR` references left as written."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            words = shlex.split(instruction.arguments)
            if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
                values[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                values[key] = value
        return values

    @property
    def copies(self) -> list[Copy]:
        found = []
        for instruction in self.all("COPY") + self.all("ADD"):
            words = instruction.exec_form or shlex.split(instruction.arguments)
            flags = [word for word in words if word.startswith("--")]
            paths = [word for word in words if not word.startswith("--")]
            from_stage = next(
                (flag.partition("=")[2] for flag in flags if flag.startswith("--from=")), None
            )
            found.append(Copy(tuple(paths[:-1]), paths[-1], from_stage))
        return found


def _logical_lines(text: str) -> Iterator[str]:
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue  # comments, parser directives, and comment lines inside a continuation
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        yield " ".join(part for part in pending if part)
        pending = []
    if pending:
        yield " ".join(part for part in pending if part)


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            words = [word for word in arguments.split() if not word.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if instruction.keyword != "ARG":
                raise ValueError(f"{instruction.keyword} before the first FROM")
        else:
            stages[-1].instructions.append(instruction)
    return stages


def dockerfile_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


# --------------------------------------------------------------------------------------------
# .dockerignore
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            parts.append(pattern[index : end + 1])
            index = end + 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


@dataclass(frozen=True)
class DockerIgnore:
    rules: tuple[tuple[bool, re.Pattern[str]], ...]  # (re-include?, pattern)

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.removeprefix("!").strip().strip("/")
            rules.append((include, _pattern_regex(pattern)))
        return cls(tuple(rules))

    def excludes(self, path: str) -> bool:
        """Whether `path` (relative, with /) stays out of the build context.

        As in Docker, a pattern that matches a parent folder matches everything inside it, and
        the last matching pattern decides.
        """
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: length + 1]) for length in range(len(parts))]
        excluded = False
        for include, pattern in self.rules:
            if any(pattern.fullmatch(prefix) for prefix in prefixes):
                excluded = not include
        return excluded


def dockerignore() -> DockerIgnore:
    return DockerIgnore.parse(DOCKERIGNORE.read_text())


# --------------------------------------------------------------------------------------------
# Terraform (HCL)
# --------------------------------------------------------------------------------------------

HCL_OPTIONS = SerializationOptions(
    with_comments=False, explicit_blocks=False, strip_string_quotes=True
)


def load_terraform() -> dict[str, Any]:
    document: dict[str, Any] = hcl2.loads(TERRAFORM.read_text(), serialization_options=HCL_OPTIONS)
    return document


def load_terraform_lock() -> dict[str, dict[str, Any]]:
    """.terraform.lock.hcl: each locked provider's version, constraints and hashes by address."""
    document = hcl2.loads(TERRAFORM_LOCK.read_text(), serialization_options=HCL_OPTIONS)
    return blocks(document, "provider")


def blocks(document: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """`variable`, `output`, ... blocks by name."""
    found: dict[str, dict[str, Any]] = {}
    for entry in document.get(kind, []):
        found.update(entry)
    return found


def resources(document: Mapping[str, Any], kind: str = "resource") -> dict[str, dict[str, Any]]:
    """Resources (or data sources, with kind="data") by "TYPE.NAME"."""
    found: dict[str, dict[str, Any]] = {}
    for entry in document.get(kind, []):
        for type_name, named in entry.items():
            for name, body in named.items():
                found[f"{type_name}.{name}"] = body
    return found


def of_type(document: Mapping[str, Any], type_name: str) -> dict[str, dict[str, Any]]:
    return {
        address: body
        for address, body in resources(document).items()
        if address.split(".")[0] == type_name
    }


def locals_(document: Mapping[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in document.get("locals", []):
        found.update(entry)
    return found


def single(value: Any) -> Any:
    """A nested block python-hcl2 returns as a one-element list."""
    assert isinstance(value, list), value
    assert len(value) == 1, value
    return value[0]


def dynamic(body: Mapping[str, Any], name: str) -> list[tuple[str, dict[str, Any]]]:
    """The `dynamic "NAME" { for_each = ..., content { ... } }` blocks of `body`, each as
    (for_each, content)."""
    found = []
    for entry in body.get("dynamic", []):
        if name in entry:
            block = entry[name]
            found.append((block["for_each"], single(block["content"])))
    return found


def with_locals(document: Mapping[str, Any], text: str) -> str:
    """`text` with each `${local.NAME}` replaced by that local, which must be a plain string."""
    values = locals_(document)

    def replace(match: re.Match[str]) -> str:
        value = values[match[1]]
        assert isinstance(value, str), (match[1], value)
        assert "${" not in value, (match[1], value)
        return value

    return re.sub(r"\$\{local\.(\w+)\}", replace, text)


def version_rule(document: Mapping[str, Any], variable: str) -> Callable[[str], bool]:
    """Whether a value passes the variable's validation, read from a condition of the form
    `can(regex("PATTERN", var.NAME))`, optionally after `var.NAME == "" ||` (empty: not used)."""
    condition = single(blocks(document, "variable")[variable]["validation"])["condition"]
    reference = re.escape(f"var.{variable}")
    optional = rf'(?P<optional>{reference} == "" \|\| )?'
    check = rf'can\(regex\("(?P<pattern>.+)", {reference}\)\)'
    match = re.fullmatch(rf"\$\{{{optional}{check}\}}", condition)
    assert match, condition
    pattern = re.compile(match["pattern"])
    empty_allowed = match["optional"] is not None
    return lambda value: (empty_allowed and value == "") or pattern.search(value) is not None


# --------------------------------------------------------------------------------------------
# Cloud Build
# --------------------------------------------------------------------------------------------

# Every default substitution Cloud Build documents ("Substituting variable values").
BUILTIN_SUBSTITUTIONS = frozenset(
    {
        "PROJECT_ID",
        "BUILD_ID",
        "PROJECT_NUMBER",
        "LOCATION",
        "TRIGGER_NAME",
        "COMMIT_SHA",
        "SHORT_SHA",
        "REVISION_ID",
        "REPO_NAME",
        "REPO_FULL_NAME",
        "BRANCH_NAME",
        "TAG_NAME",
        "REF_NAME",
        "TRIGGER_BUILD_CONFIG_PATH",
        "SERVICE_ACCOUNT_EMAIL",
        "SERVICE_ACCOUNT",
    }
)

# `$$` is a literal dollar (a bash variable for the step); `${NAME}` and `$NAME` are substitutions.
_DOLLAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def substitution_references(text: str) -> list[str]:
    """Names referenced in `text`; a `$` that starts no valid reference raises ValueError."""
    names = []
    position = 0
    while (start := text.find("$", position)) != -1:
        match = _DOLLAR.match(text, start)
        if match is None:
            raise ValueError(f"lone $ at {start} in {text!r}: write $$ for a literal dollar")
        if match["braced"] is not None:
            names.append(match["braced"])
        elif match["bare"] is not None:
            names.append(match["bare"])
        position = match.end()
    return names


def substitute(text: str, values: Mapping[str, str]) -> str:
    """`text` as Cloud Build runs it: references replaced, `$$` turned into `$`."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        return values[match["braced"] if match["braced"] is not None else match["bare"]]

    return _DOLLAR.sub(replace, text)


def load_cloudbuild() -> dict[str, Any]:
    document = yaml.safe_load(CLOUDBUILD.read_text())
    assert isinstance(document, dict)
    return document


def strings(node: Any) -> Iterator[str]:
    """Every string value inside a YAML document, keys excluded."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
