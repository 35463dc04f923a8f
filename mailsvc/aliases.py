"""Local users and aliases: parsing the files, checking and expanding aliases.

The aliases file uses the syntax of aliases(5): ``name: member, member``,
a line starting with white space continues the one before, ``#`` starts a
comment line. Only local members are supported: a user or alias name, or
``name@domain`` for a local domain; ``|command``, ``/file`` and
``:include:`` are refused. The users file holds one ``name`` or
``name: Full Name`` per line. Names are compared without regard to case
(rfc5321 2.4 lets a host treat its local parts so), so they are lower-cased;
a name may hold non-ASCII letters and digits (rfc6531 3.3, for SMTPUTF8),
kept in Unicode normal form C (rfc6532 3.1) so that every spelling of
"jörg" is one name.

Errors are ``ConfigError`` whose text starts with ``line N:``; the caller
adds which file and key it came from. Nothing here does I/O.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping

from mailsvc.errors import ConfigError

# A dot-atom local part (rfc5322 3.4.1) of safe characters, at most 64
# octets (rfc5321 4.5.3.1.1): it is also a mailbox file name in the store.
# Non-ASCII letters and digits are safe too ([^\W_] less ASCII).
_NAME_CHAR = r"(?:[a-z0-9_+-]|[^\W_\x00-\x7f])"
_NAME = re.compile(rf"{_NAME_CHAR}+(?:\.{_NAME_CHAR}+)*\Z")
_MAX_NAME = 64
# Members are separated by commas or white space; a quoted string is one
# member even with spaces in it (so '"|/bin/prog -x"' is seen whole, and refused).
_MEMBER = re.compile(r'"[^"]*"?|[^\s,]+')


def isValidName(name: str) -> bool:
    """Whether ``name`` (as ``normalName`` gives it) may be a user or alias name."""
    return len(name.encode("utf-8", "surrogatepass")) <= _MAX_NAME and _NAME.match(name) is not None


def normalName(name: str) -> str:
    """``name`` as names are compared: lower case, and NFC when not ASCII."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFC", name).lower()


def localMember(member: str, domains: Collection[str]) -> str:
    """The local name an alias member stands for, lower-cased.

    :param member: ``name`` or ``name@domain``.
    :param domains: the local domains (lower case).
    :raise ConfigError: a command, file or include member, an address in a
        domain that is not local, or a name with bad characters.
    """
    member = text = member.strip()
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        text = text[1:-1].strip()
    if text.startswith(("|", "/")) or text.lower().startswith(":include:"):
        raise ConfigError(f'"{member}": only local members are supported (no |command, /file, :include:)')
    local, at, domain = text.rpartition("@")
    if not at:
        local = text
    elif domain.lower().rstrip(".") not in domains:
        raise ConfigError(f'"{member}": only local members are supported ({domain} is not a local domain)')
    name = normalName(local)
    if not isValidName(name):
        raise ConfigError(f'"{member}": not a valid member name')
    return name


def _logicalLines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines; drop comments and blank lines. Pairs of (line number, text)."""
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not lines:
                raise ConfigError(f"line {number}: continuation line with nothing to continue")
            first, joined = lines[-1]
            lines[-1] = (first, joined + " " + line.strip())
        else:
            lines.append((number, line.strip()))
    return lines


def parseAliases(text: str, domains: Collection[str]) -> dict[str, tuple[str, ...]]:
    """Parse aliases(5) text into a mapping from name to member names.

    Members are reduced to local names (see ``localMember``), in order,
    without repeats.

    :raise ConfigError: ``line N: problem``.
    """
    aliases: dict[str, tuple[str, ...]] = {}
    for number, line in _logicalLines(text):
        name, colon, value = line.partition(":")
        if not colon:
            raise ConfigError(f'line {number}: expected "name: member, member"')
        name = normalName(name.strip())
        if not isValidName(name):
            raise ConfigError(f'line {number}: not a valid alias name: "{name}"')
        if name in aliases:
            raise ConfigError(f'line {number}: alias "{name}" is defined twice')
        members: list[str] = []
        for member in _MEMBER.findall(value):
            try:
                local = localMember(member, domains)
            except ConfigError as e:
                raise ConfigError(f"line {number}: {e}") from None
            if local not in members:
                members.append(local)
        if not members:
            raise ConfigError(f'line {number}: alias "{name}" has no members')
        aliases[name] = tuple(members)
    return aliases


def parseUsers(text: str) -> dict[str, str]:
    """Parse a users file (``name`` or ``name: Full Name`` a line) into name to full name.

    :raise ConfigError: ``line N: problem``.
    """
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, fullName = line.partition(":")
        name = normalName(name.strip())
        if not isValidName(name):
            raise ConfigError(f'line {number}: not a valid user name: "{name}"')
        users[name] = fullName.strip()
    return users


def checkAliases(users: Collection[str], aliases: Mapping[str, tuple[str, ...]]) -> None:
    """Check that every alias leads to users and that postmaster resolves.

    An alias may list itself when it is also a user ("alice: alice, bob":
    keep a copy); any other loop is an error.

    :raise ConfigError: a member that is neither a user nor an alias, an
        alias loop, or no ``postmaster`` (rfc5321 4.5.1).
    """
    for name, members in aliases.items():
        for member in members:
            if member not in users and member not in aliases:
                raise ConfigError(f'alias "{name}": member "{member}" is neither a user nor an alias')
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        # path: the aliases being expanded, outermost first, ending in name.
        if name in done:
            return
        for member in aliases[name]:
            if member not in aliases or (member == name and member in users):
                continue
            if member in path:
                loop = path[path.index(member) :] + (member,)
                raise ConfigError("alias loop: " + " -> ".join(loop))
            visit(member, path + (member,))
        done.add(name)

    for name in aliases:
        visit(name, (name,))
    if "postmaster" not in aliases and "postmaster" not in users:
        raise ConfigError("postmaster must lead to a user (rfc5321 4.5.1)")


def expandAlias(name: str, users: Collection[str], aliases: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The user names ``name`` leads to, aliases expanded recursively.

    In first-seen order without repeats; each alias is expanded once. An
    alias that lists itself and is also a user delivers to that user.
    ``()`` for a name that is neither an alias nor a user.
    """
    found: dict[str, None] = {}
    expanded: set[str] = set()

    def walk(current: str, path: frozenset[str]) -> None:
        if current in aliases and current not in path:
            if current in expanded:
                return
            expanded.add(current)
            for member in aliases[current]:
                walk(member, path | {current})
        elif current in users:
            found[current] = None

    walk(name, frozenset())
    return tuple(found)
