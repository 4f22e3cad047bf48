"""Load and validate ingestd's YAML configuration.

Every problem is reported at once, each naming the file, the line and the key, never as a traceback.
The models are frozen: nothing downstream re-validates or sees a dict from YAML.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ingestd.configwords import problem_text
from ingestd.errors import ConfigError
from ingestd.uiconfig import Ui, checked_public_read
from ingestd.walk import DEFAULT_MAX_DEPTH

__all__ = [
    "BatchFailures",
    "Config",
    "DropFolder",
    "Listener",
    "Spool",
    "Tls",
    "load_config",
    "parse_config",
    "read_yaml",
    "read_yaml_file",
    "resolve_rules",
    "validate_document",
    "validate_yaml",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash
_UID = re.compile(r"(?=.{1,64}$)(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")  # PS3.5 9.1: digits and dots


M = TypeVar("M", bound=BaseModel)

MIN_PDU_SIZE = 4096  # the smallest maximum PDU length ingestd announces (DCMTK's and dcm4che's lower bound too)
MAX_PDU_SIZE = 64 * 1024 * 1024  # the largest


class _Model(BaseModel):
    # .inf and .nan are refused: no duration, size or count of the configuration means "for ever" that way.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, not all spaces, no backslash")
    return value.strip()


class Tls(_Model):
    """DICOM TLS for the listener: our certificate and key, and the CA that signs the scanners' certificates."""

    certificate: Path
    key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _ca_when_verifying(self) -> Tls:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify callers against")
        return self


class ExtraSopClass(_Model):
    """A private storage SOP class the listener accepts besides the standard ones (a scanner's own, say)."""

    uid: str
    name: Annotated[str, Field(min_length=1, max_length=64)]

    @field_validator("uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        if not _UID.fullmatch(value):
            raise ValueError(f"'{value}' is not a UID: digits and dots, at most 64 characters (1.3.12.2.1107.5.9.1)")
        return value


class Listener(_Model):
    """The DICOM C-STORE/C-ECHO listener."""

    enabled: bool = True
    ae_title: str = "INGESTD"
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM listener serves the scanners on the lab network
    port: Annotated[int, Field(ge=0, le=65535)] = 11112  # 0: any free port (tests)
    allowed_calling_aets: tuple[str, ...] = ()
    # Private storage SOP classes accepted besides every standard one (retired included): {uid, name} each.
    extra_sop_classes: tuple[ExtraSopClass, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    processes: Annotated[int, Field(ge=1, le=64)] = 1
    max_pdu_size: Annotated[int, Field(ge=0)] = 4 * 1024 * 1024
    # The largest instance (data set) taken by C-STORE, in MiB; a larger one is refused with 0xA700, its bytes
    # discarded as they arrive. Instances are streamed to disk, so this bounds disk use, not memory.
    max_instance_mb: Annotated[int, Field(ge=1)] = 4096
    network_timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Before an association exists (ingestd/receive/gate.py): connections open at once in this process, accepted
    # or waiting to be, and per peer address; an A-ASSOCIATE-RQ must have arrived whole this long after the
    # accept (the ARTIM timer, PS3.8 §9.1.5); a TLS handshake must be done this long after the accept.
    max_connections: Annotated[int, Field(ge=1, le=10000)] = 128
    max_connections_per_peer: Annotated[int, Field(ge=1, le=10000)] = 16
    acse_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    tls_handshake_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    # The slowest a PDU may arrive, in kilobits per second (1000 bit/s), beyond network_timeout_seconds: each PDU
    # must be whole within network_timeout_seconds + its length / this rate (0: network_timeout_seconds alone).
    min_receive_rate_kbps: Annotated[float, Field(ge=0)] = 256.0
    tls: Tls | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("max_pdu_size")
    @classmethod
    def _max_pdu(cls, value: int) -> int:
        # 0 announces "no limit" (PS3.8 §D.1): a peer could then send PDUs of any size, so it is refused.
        if not MIN_PDU_SIZE <= value <= MAX_PDU_SIZE:
            raise ValueError(
                f"max_pdu_size is the largest PDU ingestd accepts: {MIN_PDU_SIZE} to {MAX_PDU_SIZE} bytes "
                "(0, no limit, would let a peer make ingestd buffer any amount)"
            )
        return value

    @model_validator(mode="after")
    def _connections(self) -> Listener:
        if self.max_connections < self.max_associations:
            raise ValueError("max_connections counts associations too: it must be at least max_associations")
        return self

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in values)

    @field_validator("extra_sop_classes")
    @classmethod
    def _extra_once(cls, values: tuple[ExtraSopClass, ...]) -> tuple[ExtraSopClass, ...]:
        uids = [value.uid for value in values]
        twice = sorted({uid for uid in uids if uids.count(uid) > 1})
        if twice:
            raise ValueError(f"SOP class {', '.join(twice)} is listed more than once")
        return values


class DropFolder(_Model):
    """A folder people drop DICOM files, folders or archives into."""

    path: Path
    settle_seconds: Annotated[float, Field(ge=0)] = 5.0
    after: Literal["delete", "move"] = "delete"
    done_folder: Path | None = None
    polling: bool = False
    poll_interval_seconds: Annotated[float, Field(gt=0)] = 2.0
    # A settled file that is not whole yet (a DICOM file or archive cut short) waits for the rest this long,
    # unchanged, before it goes to quarantine: a copy that stalls must not be taken cut short, nor wait for ever.
    incomplete_seconds: Annotated[float, Field(ge=0)] = 600.0
    # Attempts at a file that fails (cannot be read, removed or moved) before it goes to quarantine (or is left
    # in place with a note in quarantine when even that fails); a spool refusal (full) is retried without limit.
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    # Folder levels below the drop folder that are searched: a deeper folder is logged once and left alone
    # (`drop.folder_too_deep`), so that a hostile or absurd tree cannot break the scans of the rest.
    max_depth: Annotated[int, Field(ge=1, le=1000)] = DEFAULT_MAX_DEPTH

    @model_validator(mode="after")
    def _done_folder_for_move(self) -> DropFolder:
        if self.after == "move" and self.done_folder is None:
            raise ValueError("after: move needs done_folder, the folder taken files are moved to")
        return self


class Spool(_Model):
    """Where instances wait, and how much of the disk they may use."""

    min_free_mb: Annotated[int, Field(ge=0)] = 1024


class Archives(_Model):
    """Limits that keep a hostile or absurd archive out of the spool."""

    max_members: Annotated[int, Field(ge=1)] = 100_000
    max_total_mb: Annotated[int, Field(ge=1)] = 50_000
    max_member_mb: Annotated[int, Field(ge=1)] = 4_096
    max_ratio: Annotated[float, Field(ge=1)] = 200.0


class Credentials(_Model):
    """Where an XNAT server's credentials come from; never the secret itself.

    Exactly one of: `netrc` (a .netrc file, refused when group or others can read it), `file` (a 0600 file
    holding `username:password`, or `alias:secret` of an XNAT alias token), or `env_username` and
    `env_password` (the names of environment variables).
    """

    netrc: Path | None = None
    file: Path | None = None
    env_username: str | None = None
    env_password: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Credentials:
        sources = [self.netrc is not None, self.file is not None, bool(self.env_username or self.env_password)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of netrc, file, or env_username with env_password")
        if (self.env_username is None) != (self.env_password is None):
            raise ValueError("env_username and env_password go together")
        return self


class Retry(_Model):
    """How delivery retries after a retryable failure (XNAT down, 5xx, timeouts)."""

    initial_seconds: Annotated[float, Field(gt=0)] = 30.0
    max_seconds: Annotated[float, Field(gt=0)] = 3600.0
    max_attempts: Annotated[int, Field(ge=1)] = 50
    max_age_hours: Annotated[float, Field(gt=0)] = 72.0


class LoginPause(_Model):
    """How long deliveries to a server pause after it refused a login, before one login is tried again: doubling
    from `initial_seconds` up to `max_seconds`. XNAT locks an account after 20 failed logins (default
    maxFailedLogins): the defaults try at most 7 times in the first hour, then once an hour."""

    initial_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_seconds: Annotated[float, Field(gt=0)] = 3600.0


class XnatServer(_Model):
    """One XNAT server that rules route studies to (by its name)."""

    url: str
    credentials: Credentials
    verify_tls: bool = True
    ca_bundle: Path | None = None
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0
    archive_timeout_seconds: Annotated[float, Field(gt=0)] = 900.0
    poll_interval_seconds: Annotated[float, Field(gt=0)] = 5.0
    build_wait_seconds: Annotated[float, Field(gt=0)] = 60.0  # RECEIVING this long: ask XNAT to build
    # A session XNAT still writes to is never built or judged: its `lastmod` must stay the same this long first.
    # XNAT refreshes lastmod at most every 15 s while an import goes on (docs/xnat.md), so keep this above 15.
    settle_seconds: Annotated[float, Field(ge=0)] = 30.0
    ready_timeout_seconds: Annotated[float, Field(gt=0)] = 1800.0
    retry: Retry = Retry()
    login_pause: LoginPause = LoginPause()
    # Alias tokens expire (2 days after issue by default): one read from `credentials.file` is replaced by a new
    # one this long before it expires. Tokens from .netrc or the environment are only warned about.
    token_renew_seconds: Annotated[float, Field(gt=0)] = 12 * 3600.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", value):
            raise ValueError("url must be http(s)://host[:port][/path]")
        if "@" in value.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("no credentials in the url: use credentials")
        return value.rstrip("/")


class Xnat(_Model):
    servers: dict[str, XnatServer] = {}


class Delivery(_Model):
    """How routed studies are packaged and what is kept after XNAT has them."""

    compression: Literal["stored", "deflated"] = "stored"
    keep_after_delivery: bool = False  # keep spool, outbox and zip after a verified delivery
    # XNAT may answer an import and still not hold every instance (a site anonymization script that rejects a
    # file, a series import filter): what is missing is sent again this many times, then the study is held.
    max_resends: Annotated[int, Field(ge=0, le=100)] = 3


class BatchFailures(_Model):
    """What happens when one batch fails in a stage for a reason no code expected (a corrupt spool file, a
    missing outbox file, a bug): it is tried again with back-off, other batches go on, and after `max_attempts`
    it is held with the reason."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    initial_seconds: Annotated[float, Field(gt=0)] = 10.0
    max_seconds: Annotated[float, Field(gt=0)] = 600.0


class Retention(_Model):
    """How long what ingestd is done with stays in the state directory (`None`: for ever). The retention worker
    removes it every `check_interval_seconds`; `ingestd purge --dry-run` shows what would go. Nothing that is not
    delivered or released is ever removed."""

    # Copies kept after a verified delivery (`delivery.keep_after_delivery`, which `ingestd resend` needs).
    delivered_days: Annotated[float, Field(ge=0)] | None = 7.0
    released_days: Annotated[float, Field(ge=0)] | None = 30.0  # spooled files of batches a person released
    quarantine_days: Annotated[float, Field(ge=0)] | None = 30.0  # quarantined files and their reasons
    receipts_days: Annotated[float, Field(ge=0)] | None = 90.0  # the journal's receipts of delivered batches
    check_interval_seconds: Annotated[float, Field(gt=0)] = 3600.0


class Attachments(_Model):
    """Non-DICOM files attached to XNAT sessions as resources (a rule's `attach:`; docs/rules.md)."""

    # How often a set held `no-session` (its session is not in XNAT yet) or `study-held` (its study is held) looks
    # again: it moves on by itself once the session exists or the study is routed.
    recheck_seconds: Annotated[float, Field(gt=0)] = 300.0


class Logging(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Metrics(_Model):
    """The Prometheus metrics and /healthz endpoint. Loopback only unless the admin opens it on purpose."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9471


class Config(_Model):
    """The whole of ingestd.yaml."""

    state_dir: Path
    listener: Listener = Listener()
    drop_folders: tuple[DropFolder, ...] = ()
    spool: Spool = Spool()
    archives: Archives = Archives()
    study_idle_seconds: Annotated[float, Field(gt=0)] = 120.0
    study_max_wait_seconds: Annotated[float, Field(gt=0)] = 6 * 3600.0
    # SIGTERM/SIGINT to exit: what is still running then is abandoned (the journal resumes it). systemd's
    # TimeoutStopSec= (systemd/ingestd.service) and Docker's stop_grace_period must stay above it.
    stop_timeout_seconds: Annotated[float, Field(ge=1, le=3600)] = 60.0
    # A worker check (assembler, router, deliverer) that makes no progress this long is wedged: the watchdog
    # pings stop and the daemon exits with status 1. The deliverer's limit is at least its longest XNAT wait.
    wedged_worker_seconds: Annotated[float, Field(gt=0)] = 300.0
    logging: Logging = Logging()
    metrics: Metrics = Metrics()
    xnat: Xnat = Xnat()
    delivery: Delivery = Delivery()
    batch_failures: BatchFailures = BatchFailures()
    retention: Retention = Retention()
    attachments: Attachments = Attachments()
    ui: Ui = Ui()  # the web page under /ui/ of the metrics endpoint (ingestd/uiconfig.py)
    rules: tuple[Path, ...] = ()  # rules files (relative: to the configuration file's folder); none: nothing is routed

    @model_validator(mode="after")
    def _wait_above_idle(self) -> Config:
        if self.study_max_wait_seconds < self.study_idle_seconds:
            raise ValueError("study_max_wait_seconds must not be shorter than study_idle_seconds")
        return self

    @field_validator("ui")
    @classmethod
    def _public_read_on_loopback(cls, ui: Ui, info: ValidationInfo) -> Ui:
        metrics = info.data.get("metrics")  # absent when it failed: its own error says why
        return ui if metrics is None else checked_public_read(ui, metrics.host)

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite"

    @property
    def association_grace_seconds(self) -> float:
        """How long a stopping listener lets open associations go on before aborting them (stores in flight
        finish): a third of the stop deadline, at most 10 s, so that the rest of the stop fits in the deadline."""
        return min(10.0, self.stop_timeout_seconds / 3)


# What a configuration or rules file may be. Real ones are a few kB, a few thousand nodes and under ten levels deep;
# the limits are far above that and far below what would hurt the daemon (a reload runs inside it).
MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded: what the validation walks
MAX_ALIAS_NODES = 10_000  # nodes reached through aliases (*name), summed over the document
MAX_YAML_DEPTH = 64  # nesting, aliases expanded


class YamlLimitError(yaml.MarkedYAMLError):
    """A document past one of the limits above, or a value that cannot be read; `problem_mark` is where."""


class _LineLoader(yaml.SafeLoader):
    """A safe loader that composes within the limits above, counting every alias as the nodes it stands for.

    Anchors and aliases stay allowed, since a rules file may share a block between rules with `&name`/`*name`
    or `<<: *name`. But an alias is not a copy for PyYAML, only for everything that walks the document after it
    (line numbers, duplicate keys, validation), so nine aliases of nine aliases... (a "billion laughs") cost
    nothing to parse and everything afterwards. Each alias is counted as the nodes it expands to, and past
    MAX_ALIAS_NODES the document is refused at the alias's line, before anything walks it; an alias inside its
    own anchor (a recursive document) is refused too.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth), aliases expanded
        self._nodes = 0
        self._through_aliases = 0
        self._depth = 0

    def _refuse(self, problem: str, mark: yaml.Mark | None) -> YamlLimitError:
        return YamlLimitError(problem=problem, problem_mark=mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:
                size = self._sizes.get(id(anchored))
                if size is None:
                    raise self._refuse(f"the alias *{event.anchor} is inside its own anchor", event.start_mark)
                nodes, depth = size
                self._through_aliases += nodes
                self._nodes += nodes
                if self._through_aliases > MAX_ALIAS_NODES:
                    raise self._refuse(
                        f"aliases expand to more than {MAX_ALIAS_NODES} nodes (a YAML alias bomb?): "
                        "write the repeated blocks out, or use fewer aliases",
                        event.start_mark,
                    )
                self._check(self._depth + depth, event.start_mark)
            return super().compose_node(parent, index)
        self._nodes += 1
        self._depth += 1
        try:
            self._check(self._depth, self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        sizes = [self._sizes[id(child)] for child in children]
        self._sizes[id(node)] = (1 + sum(n for n, _ in sizes), 1 + max((d for _, d in sizes), default=0))
        return node

    def _check(self, depth: int, mark: yaml.Mark | None) -> None:
        if self._nodes > MAX_YAML_NODES:
            raise self._refuse(f"more than {MAX_YAML_NODES} values (aliases expanded): too large", mark)
        if depth > MAX_YAML_DEPTH:
            raise self._refuse(f"nested more than {MAX_YAML_DEPTH} levels deep (aliases expanded)", mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:  # 2001-13-45, an integer of 5000 digits, ...
            raise self._refuse(f"cannot read this value: {exc}", node.start_mark) from None


def _key_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[(*path, key)] = key_node.start_mark.line + 1
            _key_lines(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _key_lines(item, (*path, index), lines)


def _line_of(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


@dataclass(frozen=True)
class YamlDocument:
    """A configuration or rules file as read: its composed node (None when empty), the data constructed from it,
    and the line of every key by its path."""

    node: yaml.Node | None
    data: Any
    lines: dict[tuple[Any, ...], int]


def read_yaml_file(path: Path, what: str = "configuration") -> str:
    """The text of a configuration or rules file, at most MAX_YAML_BYTES; raise ConfigError."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"{path}: cannot read the {what}: {exc.strerror}"]) from None
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(str(path), [f"{path}: the {what} is larger than {MAX_YAML_BYTES // 1024} KiB"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), [f"{path}: the {what} is not UTF-8 text"]) from None


def read_yaml(
    text: str, source: str, *, what: str = "configuration", inspect: Callable[[yaml.Node], None] | None = None
) -> YamlDocument:
    """Safe-load YAML text within the limits above; raise ConfigError with `source:line` on any problem.

    `inspect` is given the composed node before the data is constructed from it (which flattens `<<` merges
    into the node), as the file wrote it.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(source, [f"{source}: the {what} is larger than {MAX_YAML_BYTES // 1024} KiB"])
    loader = _LineLoader(text)
    lines: dict[tuple[Any, ...], int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _key_lines(node, (), lines)  # before constructing, which flattens `<<` merges into the node
            if inspect is not None:
                inspect(node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        prefix = "" if isinstance(exc, YamlLimitError) else "not valid YAML: "
        raise ConfigError(source, [f"{where}: {prefix}{problem}"]) from None
    finally:
        loader.dispose()
    return YamlDocument(node, data, lines)


def validate_document(
    document: YamlDocument, source: str, model: type[M], *, what: str = "configuration", plain: bool = False
) -> M:
    """Validate a document read by `read_yaml` against `model`; raise ConfigError listing every problem.

    Each problem names `source`, the line and the dotted key, e.g. `rules.yaml:12: rules.0.when.Modalty: ...`;
    `plain`: in ingestd's words ("must be a list", did-you-mean for unknown keys), not pydantic's.
    """
    data = {} if document.data is None else document.data
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{source}:1: the {what} must be a mapping of keys to values"])
    try:
        return model.model_validate(data, context={"source": source})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
            line = _line_of(loc, document.lines)
            key = ".".join(str(part) for part in loc) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            if plain:
                message = problem_text(error, model, loc)
            elif error["type"] == "extra_forbidden":
                message = "unknown key"
            elif error["type"] == "missing":
                message = "required key is missing"
            problems.append(f"{source}:{line if line is not None else 1}: {key}: {message}")
        raise ConfigError(source, problems) from None


def validate_yaml(text: str, source: str, model: type[M], *, what: str = "configuration", plain: bool = False) -> M:
    """Safe-load YAML text (within the limits above) and validate it against `model`; raise ConfigError listing
    every problem, each as `source:line: key: message`."""
    return validate_document(read_yaml(text, source, what=what), source, model, what=what, plain=plain)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate configuration text; raise ConfigError listing every problem, in ingestd's words."""
    return validate_yaml(text, source, Config, plain=True)


def load_config(path: Path) -> Config:
    """Read and validate the configuration file at `path`."""
    return resolve_rules(parse_config(read_yaml_file(path), str(path)), path)


def resolve_rules(config: Config, path: Path) -> Config:
    """`config` with its relative rules paths taken from the folder of its file, `path`."""
    if any(not rules.is_absolute() for rules in config.rules):
        resolved = tuple(rules if rules.is_absolute() else path.parent / rules for rules in config.rules)
        config = config.model_copy(update={"rules": resolved})
    return config
