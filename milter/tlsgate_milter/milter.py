"""The milter: one :class:`TlsgateMilter` per SMTP connection, judging with the shared engine.

Postfix (or Sendmail) tells the milter the client address at connect and the TLS state in
macros; each recipient is judged at RCPT (a refusal refuses that recipient only), and
connectors scoped by the RFC 5322 header From domain are judged at end of message, on top of
the RCPT verdict whatever sender or recipient connector decided there; the strictest verdict
refuses the whole message. The verdict is recorded in a trace header after every incoming
header of that name was removed. The engine and the rules are reached
through a :class:`Judge` handed to each handler by the factory; nothing is module-global
except what pymilter itself requires (``Milter.factory``). Any exception in a callback
answers TEMPFAIL: the milter never accepts by accident.
"""

from __future__ import annotations

import functools
import grp
import importlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import Milter

from tlsgate import logsetup
from tlsgate.config import Config, resolve_myorigin
from tlsgate.decisionlog import log_decision
from tlsgate.engine import check_requirements, decide, decide_header_from, unreadable_address, with_myorigin
from tlsgate.metrics import Metrics
from tlsgate.model import (
    CertRequirement,
    Decision,
    FailAction,
    InboundConnector,
    Mode,
    Outcome,
    Scope,
    SessionFacts,
    Stage,
)
from tlsgate.patterns import Address, judged_domain, raw_domain
from tlsgate.snapshot import Snapshot
from tlsgate_milter.translate import (
    MAX_FROM_FIELDS,
    MAX_FROM_VALUE,
    MAX_PROTECTED_DOMAINS,
    MTA_MACRO,
    RECIPIENT_MACRO,
    SENDER_MACRO,
    VERIFY_MACRO,
    AddressTooLong,
    TlsFacts,
    client_address,
    client_name,
    envelope_address,
    header_from_authors,
    is_postfix,
    plainly_spelt,
    reply_text,
    tls_from_macros,
    trace_value,
)

log = logging.getLogger("tlsgate.milter")

#: the engine's checks of certificate names, which the MTA must vouch for (see _decide)
NAME_CHECKS = frozenset({"trusted certificate", "certificate name", "issuer"})

# pymilter's C extension is the top-level module "milter"; the repository's milter/ source
# folder has the same name, so it is looked up by name (a namespace folder never wins
# over a real module at run time, but it confuses the type checker).
libmilter: Any = importlib.import_module("milter")

CONTINUE: int = Milter.CONTINUE
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL

NAME = "tlsgate-milter"
MAX_QUEUE_ID = 32
# What the trace header needs: adding ours, deleting incoming copies.
TRACE_ACTIONS: int = Milter.ADDHDRS | Milter.CHGHDRS

# The requirements a connector that pins certificates checks against the registered
# certificate; a milter under Postfix never learns the fingerprint, so these cannot pass.
_PIN_REQUIREMENTS = frozenset(
    {"pinned certificate", "organization", "organizational unit", "key strength",
     "certificate name", "issuer"}
)


@dataclass(frozen=True)
class MilterSettings:
    """The parts of the configuration a connection handler needs."""

    trace_header: bool = True
    header_name: str = "X-TLSgate"
    pinned_action: str = "tempfail"  # or "policyd"
    unknown_rules_action: str = "defer"  # or "reject"
    unknown_rules_text: str = "TLS policy rules are not available, try again later"
    myorigin: str | None = None  # see tlsgate.engine.with_myorigin

    @classmethod
    def from_config(cls, cfg: Config) -> MilterSettings:
        return cls(
            trace_header=cfg.milter.trace_header,
            header_name=cfg.milter.header_name,
            pinned_action=cfg.milter.pinned_action,
            unknown_rules_action=cfg.engine.unknown_rules_action,
            unknown_rules_text=cfg.engine.unknown_rules_text,
            myorigin=resolve_myorigin(cfg.engine),
        )


class Activity:
    """How many sessions started a message and are not closed yet, so a stop can wait for them.

    A session counts until it closes (or aborts), not just until end of data: the reply to
    end of data is written by libmilter after the callback returns, and exiting in between
    would lose it.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def begin(self) -> None:
        with self._idle:
            self._count += 1

    def end(self) -> None:
        with self._idle:
            self._count = max(0, self._count - 1)
            if self._count == 0:
                self._idle.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


@dataclass(frozen=True)
class Judge:
    """Everything a handler decides with: the current snapshot, the settings, the clock."""

    snapshot: Callable[[], Snapshot | None]
    settings: MilterSettings = field(default_factory=MilterSettings)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    activity: Activity = field(default_factory=Activity)
    metrics: Metrics | None = None

    def decide(self, snapshot: Snapshot, facts: SessionFacts, *, header_from: bool = False) -> Decision:
        """The engine's verdict, with pinned-certificate connectors handled as configured;
        with ``header_from``, the verdict of the header-From connectors alone
        (:func:`tlsgate.engine.decide_header_from`)."""
        engine_decide = decide_header_from if header_from else decide
        decision = engine_decide(snapshot, facts, self.clock())
        if not _unverifiable_pin(decision) or decision.action is None:
            return decision
        assert decision.connector is not None
        name = decision.connector.name
        # The policy daemon never sees the header From: a connector scoped by it would be
        # checked by no one, so it is refused here as with pinned_action = tempfail.
        if self.settings.pinned_action == "policyd" and not decision.connector.header_from_domains:
            return replace(
                decision,
                outcome=Outcome.PASS,
                action=None,
                status=None,
                reason=f"connector {name} pins certificates: left to the policy daemon",
                reply=None,
            )
        reason = (
            f"connector {name} requires a pinned certificate, which the milter cannot check "
            "(no certificate fingerprint macro)"
        )
        return replace(
            decision,
            action=FailAction.DEFER,
            status="4.3.5",
            reason=reason,
            reply=f"TLS policy of connector {name} cannot be checked here, try again later",
        )


def _unverifiable_pin(decision: Decision) -> bool:
    connector = decision.connector
    if connector is None or connector.certificate is not CertRequirement.PINNED:
        return False
    if decision.outcome is Outcome.PASS:
        return False
    failed = next((check for check in decision.checks if not check.ok), None)
    return failed is not None and failed.requirement in _PIN_REQUIREMENTS


_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(callback: _F) -> _F:
    """Answer TEMPFAIL, logged with the queue id, when a callback raises."""

    @functools.wraps(callback)
    def wrapper(self: TlsgateMilter, *args: Any) -> Any:
        try:
            return callback(self, *args)
        except Exception:  # noqa: BLE001 - any failure must answer TEMPFAIL, never accept
            return self._internal_error(callback.__name__)

    return wrapper  # type: ignore[return-value]


_SESSION_CALLBACKS = frozenset({"connect", "hello"})


def _no_reply(callback: _F) -> _F:
    """A callback the MTA does not wait for (``Milter.noreply``, when the MTA offers it). A
    failure cannot be answered there, so it is logged and answered at the next callback that
    replies (RCPT or end of message) with TEMPFAIL: for the rest of the session after a connect
    or HELO failure, for the message after a MAIL FROM or header failure. No message passes
    without a decision."""

    name = callback.__name__

    @functools.wraps(callback)
    def wrapper(self: TlsgateMilter, *args: Any) -> Any:
        try:
            return callback(self, *args)
        except Exception:  # noqa: BLE001 - logged by logsetup.failure; the next reply is TEMPFAIL
            if name in _SESSION_CALLBACKS:
                self._session_failure = name
            else:
                self._message_failure = name
            logsetup.failure(log, "%s: %s callback failed; answering TEMPFAIL at the next command",
                             self._queue_id or "NOQUEUE", name)
            return CONTINUE

    return cast(_F, Milter.noreply(wrapper))


class TlsgateMilter(Milter.Base):  # type: ignore[misc]
    """The state of one SMTP connection, and the callbacks that judge its messages."""

    def __init__(self, judge: Judge) -> None:
        self._judge = judge
        self._client: Address | None = None
        self._client_name: str | None = None
        self._tls = TlsFacts()
        self._host: str | None = None
        self._mta: str | None = None  # the v macro: whether Postfix vouches for cert names
        self._names_ignored = False  # logged once per session
        self._undecodable_warned = False  # a macro that is not UTF-8, logged once per session
        self._queue_id: str | None = None
        self._busy = False  # counted in Activity from MAIL FROM until abort or close
        self._session_failure: str | None = None  # connect or HELO failed, unanswered
        self._held: list[tuple[SessionFacts, Decision]] = []
        self._reset_message()

    # --------------------------------------------------------------- per message state

    def _reset_message(self) -> None:
        """Forget the message. Decision lines still held (the message ended before its end of
        data: RSET, a lost connection, a refusal of every recipient) are written first."""
        self._write_held()
        self._sender: str | None = None
        self._sender_too_long: AddressTooLong | None = None
        self._sender_unread = False  # spelt with syntax only the MTA reads, and not given as it read it
        self._accepted: list[tuple[str, Decision]] = []
        self._from_values: list[str] = []
        self._from_malformed: str | None = None
        self._trace_count = 0
        self._queue_id = None
        self._message_failure: str | None = None  # MAIL FROM or a header failed, unanswered

    def _leave(self) -> None:
        """The session is done with its messages (abort or close)."""
        if self._busy:
            self._busy = False
            self._judge.activity.end()

    def _macro(self, name: str) -> str | None:
        try:
            value = self.getsymval(name)
        except UnicodeDecodeError:
            # pymilter decodes every macro as UTF-8 and raises on any other byte. Such a macro
            # is taken as absent, which fails closed: no TLS, no certificate name, no queue id.
            if not self._undecodable_warned:
                self._undecodable_warned = True
                log.warning("%s: macro %s is not UTF-8: taken as absent (logged once per session)",
                            self._queue_id or "NOQUEUE", name)
            return None
        return value if isinstance(value, str) and value else None

    def _refresh(self) -> None:
        """Read the macros this callback carries; later ones add to what is known."""
        mta = self._macro(MTA_MACRO)
        if mta:
            self._mta = mta[:255]
        self._tls = self._tls.merged(tls_from_macros(self._macro, self._mta))
        if (
            not self._names_ignored
            and self._tls.protocol is not None
            and self._tls.cert_subject is None
            and self._macro("{cert_subject}") is not None
            and self._macro(VERIFY_MACRO) is None
            and not is_postfix(self._mta)
        ):
            self._names_ignored = True
            log.warning(
                "%s: client certificate name ignored: the MTA (v=%s) is not Postfix and sent no "
                "{verify} macro to say whether the certificate verified",
                self._queue_id or "NOQUEUE", self._mta or "unknown",
            )
        queue_id = self._macro("i")
        if queue_id:
            self._queue_id = queue_id[:MAX_QUEUE_ID]
        host = self._macro("j")
        if host:
            self._host = host[:255]

    def _facts(self, stage: Stage, recipient: str | None, header_from: str | None = None) -> SessionFacts:
        tls = self._tls
        facts = SessionFacts(
            client_address=self._client,
            sender=self._sender,
            recipient=recipient,
            header_from=header_from,
            tls_protocol=tls.protocol,
            tls_cipher=tls.cipher,
            tls_cipher_bits=tls.cipher_bits,
            cert_subject=tls.cert_subject,
            cert_issuer=tls.cert_issuer,
            stage=stage,
            queue_id=self._queue_id,
            client_name=self._client_name,
        )
        return with_myorigin(facts, self._judge.settings.myorigin)

    def _decide(self, snapshot: Snapshot, facts: SessionFacts, *, header_from: bool = False) -> tuple[Decision, float]:
        """The decision, and the seconds it took (for the metrics).

        A refusal for good over certificate names that the MTA sent without saying they
        verified (no ``v`` naming Postfix, no ``{verify}``: see _refresh) waits instead: the
        fault is this host's configuration, and the partner's mail must outlive its repair.
        """
        started = time.perf_counter()
        decision = self._judge.decide(snapshot, facts, header_from=header_from)
        failed = [check.requirement for check in decision.checks if not check.ok]
        if (self._names_ignored and decision.action is FailAction.REJECT and failed
                and all(requirement in NAME_CHECKS for requirement in failed)):
            reason = (f"{decision.reason}; the MTA sent the client certificate's names without saying they "
                      "verified (no v macro naming Postfix, no {verify}), so they were not counted")
            decision = replace(decision, action=FailAction.DEFER, status="4.3.5", reason=reason,
                               reply=f"{decision.reply or decision.reason}; try again later")
        return decision, time.perf_counter() - started

    def _log(self, facts: SessionFacts, decision: Decision, seconds: float) -> None:
        """The decision's mail log line, and its count in the metrics."""
        if self._judge.metrics is not None:
            self._judge.metrics.record(decision, seconds)
        log_decision(log, facts, decision, stage=facts.stage.value)

    def _hold(self, facts: SessionFacts, decision: Decision, seconds: float) -> None:
        """Count an accepted recipient's decision now and write its line once the queue id is
        known: Postfix opens the queue file only after the first recipient it accepts (with
        its default smtpd_delay_open_until_valid_rcpt = yes), so the first RCPT has no ``i``."""
        if self._judge.metrics is not None:
            self._judge.metrics.record(decision, seconds)
        self._held.append((facts, decision))

    def _write_held(self) -> None:
        """Write the held decision lines, with the queue id if Postfix assigned one by now."""
        held, self._held = self._held, []
        for facts, decision in held:
            if self._queue_id is not None:
                facts = replace(facts, queue_id=self._queue_id)
            log_decision(log, facts, decision, stage=facts.stage.value)

    def _refuse(self, decision: Decision) -> int:
        code = str(decision.smtp_code or 450)
        status = decision.status or ("5.7.1" if code.startswith("5") else "4.7.1")
        self.setreply(code, status, reply_text(decision.reply, "TLS policy not met"))
        return REJECT if decision.action is FailAction.REJECT else TEMPFAIL

    def _refuse_unknown_rules(self) -> int:
        settings = self._judge.settings
        if self._judge.metrics is not None:
            self._judge.metrics.record(None, 0.0)
        text = reply_text(settings.unknown_rules_text, "TLS policy rules are not available")
        log.warning(
            "%s: %s client=%s[%s]: no rules loaded yet",
            self._queue_id or "NOQUEUE",
            "reject" if settings.unknown_rules_action == "reject" else "defer",
            self._client_name or "unknown",
            self._client or "unknown",
        )
        if settings.unknown_rules_action == "reject":
            self.setreply("550", "5.3.5", text)
            return REJECT
        self.setreply("451", "4.3.5", text)
        return TEMPFAIL

    def _refuse_long_address(self, which: str, too_long: AddressTooLong, recipient: str | None = None) -> int:
        """TEMPFAIL for an envelope address too long to judge whole (see MAX_ENVELOPE)."""
        status = "4.1.7" if which == "sender" else "4.1.3"
        reason = f"{which} address too long to judge: {too_long}"
        if self._judge.metrics is not None:
            self._judge.metrics.record(Decision(Outcome.FAIL, FailAction.DEFER, None, status, reason), 0.0)
        log.warning(
            "%s: defer stage=rcpt client=%s[%s] %s status=%s reason=\"%s\"",
            self._queue_id or "NOQUEUE",
            self._client_name or "unknown",
            self._client or "unknown",
            f"to=<{recipient}>" if recipient is not None else f"from=<{self._sender or ''}>",
            status,
            reason,
        )
        self.setreply("451", status, f"{which.capitalize()} address too long, try again later")
        return TEMPFAIL

    def _refuse_malformed_from(self, problem: str, enforcing: list[InboundConnector]) -> int:
        """A From header that cannot be judged in full could hide a protected author: refused
        as the strictest enforcing header-From connector would refuse, temporarily unless one
        of them rejects."""
        reject = any(c.on_failure is FailAction.REJECT and not c.misconfigured for c in enforcing)
        code, status = ("550", "5.7.1") if reject else ("450", "4.7.1")
        log.info(
            "%s: %s connector=%s stage=data client=%s[%s] from=<%s> status=%s reason=\"%s\"",
            self._queue_id or "NOQUEUE",
            "reject" if reject else "defer",
            ",".join(sorted(c.name for c in enforcing)),
            self._client_name or "unknown",
            self._client or "unknown",
            self._sender or "",
            status,
            problem,
        )
        self.setreply(code, status, reply_text(f"Message refused: {problem}", "Message refused"))
        return REJECT if reject else TEMPFAIL

    def _monitor_malformed_from(self, problem: str, monitored: list[InboundConnector]) -> list[Decision]:
        """What monitor-mode header-From connectors would have done with a From header too
        big to judge whole: logged and recorded in the trace header, the message goes on."""
        decisions = []
        facts = self._facts(Stage.DATA, None)
        for connector in monitored:
            reject = connector.on_failure is FailAction.REJECT and not connector.misconfigured
            decision = Decision(Outcome.FAIL, None, connector, "5.7.1" if reject else "4.7.1", problem, problem)
            self._log(facts, decision, 0.0)
            decisions.append(decision)
        return decisions

    def _earlier_failure(self) -> int:
        """TEMPFAIL for a callback that replies, after one that could not (logged there)."""
        log.warning("%s: answering TEMPFAIL: the %s callback failed earlier in this session",
                    self._queue_id or "NOQUEUE", self._session_failure or self._message_failure)
        return self._tempfail()

    def _internal_error(self, callback: str) -> int:
        logsetup.failure(log, "%s: %s callback failed, answering TEMPFAIL", self._queue_id or "NOQUEUE", callback)
        if callback in ("close", "abort"):
            return CONTINUE
        return self._tempfail()

    def _tempfail(self) -> int:
        """451 4.3.0: something went wrong here; the client tries again later."""
        if self._judge.metrics is not None:
            self._judge.metrics.record_error()
        try:
            self.setreply("451", "4.3.0", "tlsgate-milter internal error, try again later")
        except Exception:  # noqa: BLE001 - logged by logsetup.failure
            logsetup.failure(log, "%s: cannot set the reply", self._queue_id or "NOQUEUE")
        return TEMPFAIL

    # --------------------------------------------------------------- callbacks

    def negotiate(self, opts: list[int]) -> int:
        rc: int = super().negotiate(opts)
        if rc != CONTINUE:
            return rc
        wanted = TRACE_ACTIONS if self._judge.settings.trace_header else 0
        if opts[0] & wanted != wanted:
            log.warning("the MTA does not offer header changes: the trace header cannot be written")
        opts[0] = self._actions = opts[0] & wanted
        return rc

    @_no_reply
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        self._client = client_address(family, hostaddr)
        self._client_name = client_name(hostname)
        self._refresh()
        return CONTINUE

    @_no_reply
    def hello(self, heloname: str) -> int:
        self._refresh()
        return CONTINUE

    @_no_reply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._reset_message()
        if not self._busy:
            self._busy = True
            self._judge.activity.begin()
        self._refresh()
        read, self._sender_unread = self._as_read(SENDER_MACRO, mailfrom)
        try:
            self._sender = envelope_address(read)
        except AddressTooLong as too_long:
            self._sender_too_long = too_long  # answered at each RCPT: MAIL gets no reply
        return CONTINUE

    @_guarded
    def envrcpt(self, to: str, *params: str) -> int:
        if self._session_failure or self._message_failure:
            return self._earlier_failure()
        self._refresh()
        snapshot = self._judge.snapshot()
        if snapshot is None:
            return self._refuse_unknown_rules()
        read, unread = self._as_read(RECIPIENT_MACRO, to)
        try:
            recipient = envelope_address(read)
        except AddressTooLong as too_long:
            return self._refuse_long_address("recipient", too_long)
        if self._sender_too_long is not None:
            return self._refuse_long_address("sender", self._sender_too_long, recipient)
        facts = self._facts(Stage.RCPT, recipient)
        refusal = None
        if self._sender_unread:
            refusal = unreadable_address(snapshot, Scope.SENDER, self._sender or "")
        if refusal is None and unread:
            refusal = unreadable_address(snapshot, Scope.RECIPIENT, recipient)
        decision, seconds = (refusal, 0.0) if refusal is not None else self._decide(snapshot, facts)
        if decision.action is not None:
            self._log(facts, decision, seconds)  # NOQUEUE for the first recipient, as Postfix logs it
            return self._refuse(decision)
        self._hold(facts, decision, seconds)
        self._accepted.append((recipient, decision))
        return CONTINUE

    def _as_read(self, macro: str, argument: str) -> tuple[str, bool]:
        """The envelope address as Postfix read it (its macro), else the client's spelling;
        and whether that spelling holds syntax only the MTA's parser reads (see
        :func:`~tlsgate.engine.unreadable_address`). Sendmail's macros of the same names hold
        ruleset 0's result instead (``bob`` for a local user, a virtusertable target), which
        is no address to judge: under Sendmail the spelling is judged."""
        value = self._macro(macro) if is_postfix(self._mta) else None
        if value is not None:
            return value, False
        return argument, not plainly_spelt(argument)

    @_no_reply
    def header(self, name: str, value: str) -> int:
        lowered = name.lower()
        if lowered == "from":
            if len(self._from_values) >= MAX_FROM_FIELDS:
                self._from_malformed = f"more than {MAX_FROM_FIELDS} From header fields"
            elif len(value) > MAX_FROM_VALUE:
                self._from_malformed = f"a From header field longer than {MAX_FROM_VALUE} characters"
            else:
                self._from_values.append(value)
        elif lowered == self._judge.settings.header_name.lower():
            self._trace_count += 1
        return CONTINUE

    @_guarded
    def eom(self) -> int:
        try:
            return self._end_of_message()
        finally:
            self._reset_message()

    def _end_of_message(self) -> int:
        if self._session_failure or self._message_failure:
            return self._earlier_failure()
        self._refresh()
        self._write_held()  # the RCPT lines, now with the queue id
        snapshot = self._judge.snapshot()
        if snapshot is None:
            return self._refuse_unknown_rules()
        # Only author domains some header-From connector is scoped to can change a verdict;
        # the others need no per-recipient decision, and one author per domain is enough.
        index = snapshot.domains[Scope.HEADER_FROM]
        protected: dict[str, str] = {}
        for author in header_from_authors(self._from_values):
            domain = judged_domain(author)  # mx_1.bank.test is under bank.test too
            if domain is not None and index.lookup(domain):
                protected.setdefault(domain, author)
            elif domain is None and index.lookup_any():  # an address literal meets * alone
                protected.setdefault(raw_domain(author).lower(), author)
        problem = self._from_malformed
        if problem is None and len(protected) > MAX_PROTECTED_DOMAINS:
            problem = f"authors from more than {MAX_PROTECTED_DOMAINS} protected domains"
        authors = list(protected.values())
        monitored: list[Decision] = []
        if problem is not None:
            guarding = [c for c in snapshot.inbound if c.enabled and c.header_from_domains]
            # A hidden author could only be refused by a connector whose requirements this
            # session fails: one that meets them all gives nothing to hide.
            facts = self._facts(Stage.DATA, None)
            now = self._judge.clock()
            failing = [c for c in guarding
                       if c.misconfigured or not all(check.ok for check, _ in check_requirements(c, facts, now))]
            enforcing = [c for c in failing if c.mode is Mode.ENFORCE]
            if enforcing:
                return self._refuse_malformed_from(problem, enforcing)
            monitored = self._monitor_malformed_from(problem, failing)
            authors = authors[:MAX_PROTECTED_DOMAINS]  # judged for the log only, within bounds
        # The RCPT verdicts stand; the header-From connectors are judged on top of them, by
        # themselves: ranked with the sender and recipient connectors, a sender connector
        # (even one for *) would win and hide them. The strictest refusal refuses the message.
        standing = [at_rcpt for _, at_rcpt in self._accepted] + monitored
        refusal: Decision | None = None
        for recipient, _ in self._accepted:
            for author in authors:
                facts = self._facts(Stage.DATA, recipient, author)
                decision, seconds = self._decide(snapshot, facts, header_from=True)
                if decision.connector is None and decision.action is None:
                    continue  # no header-From connector protects this author's domain
                self._log(facts, decision, seconds)
                standing.append(decision)
                if decision.action is not None and (
                    refusal is None or decision.severity > refusal.severity
                ):
                    refusal = decision
        if refusal is not None:
            return self._refuse(refusal)
        settings = self._judge.settings
        # Without the actions (logged at negotiation) the message goes on without the header.
        if settings.trace_header and self._actions & TRACE_ACTIONS == TRACE_ACTIONS:
            # Delete from the last occurrence up, so earlier indexes stay valid whether or
            # not the MTA renumbers after a deletion.
            for index_ in range(self._trace_count, 0, -1):
                self.chgheader(settings.header_name, index_, "")
            value = trace_value(self._host, self._facts(Stage.DATA, None), standing)
            self.addheader(settings.header_name, value, 0)
        return CONTINUE

    @_guarded
    def abort(self) -> int:
        self._reset_message()
        self._leave()
        return CONTINUE

    @_guarded
    def close(self) -> int:
        self._reset_message()
        self._leave()
        return CONTINUE


# ------------------------------------------------------------------- running the milter


def libmilter_address(listen: str) -> str:
    """Postfix-style ``unix:/path`` or ``inet:HOST:PORT`` -> libmilter's ``inet:PORT@HOST``."""
    if listen.startswith("unix:"):
        return listen
    if not listen.startswith("inet:"):
        raise ValueError(f"{listen!r} is not unix:/PATH or inet:HOST:PORT")
    host, sep, port = listen[len("inet:"):].rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"{listen!r} is not unix:/PATH or inet:HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        return f"inet6:{port}@{host[1:-1]}"
    return f"inet:{port}@{host}"


def socket_path(listen: str) -> str | None:
    return listen[len("unix:"):] if listen.startswith("unix:") else None


def _install_callbacks() -> None:
    # What Milter.runmilter does before it opens the socket; done here so that the socket
    # can get its mode and group between opensocket() and main().
    libmilter.set_connect_callback(Milter.connect_callback)
    libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    libmilter.set_close_callback(Milter.close_callback)


def open_socket(judge: Judge, listen: str, mode: int, group: str | None, timeout: float) -> None:
    """Register the milter with libmilter and create its listening socket.

    A unix socket is created under a umask that already denies what ``mode`` denies, then
    given ``group`` and exactly ``mode``, so it is never more open than configured.
    """
    # pymilter calls this global to make one handler per connection; the partial carries
    # the judge, so the handler class itself has no global state.
    Milter.factory = functools.partial(TlsgateMilter, judge)
    _install_callbacks()
    libmilter.setconn(libmilter_address(listen))
    libmilter.settimeout(max(1, int(timeout)))
    libmilter.register(
        NAME,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )
    path = socket_path(listen)
    old_umask = os.umask(0o777 & ~mode) if path else None
    try:
        libmilter.opensocket(True)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    if path:
        if group:
            # Created in the setgid socket directory tmpfiles makes, the socket has its group
            # already; the unit's system call filter lets chown through for any other group.
            gid = grp.getgrnam(group).gr_gid
            if os.stat(path).st_gid != gid:
                os.chown(path, -1, gid)
        os.chmod(path, mode)
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} is not a socket after opening it")


def serve() -> None:
    """Run libmilter's accept loop; blocks the calling thread until the process ends."""
    libmilter.main()
