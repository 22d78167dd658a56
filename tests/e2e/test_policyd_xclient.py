"""A client whose address Postfix does not know, through a real private Postfix and
tlsgate-policyd: XCLIENT ADDR=[UNAVAILABLE] from an authorised host (a content filter or proxy
in front of Postfix) makes the policy request say client_address=unknown. A connector that
selects or restricts sessions by client address cannot tell whether it applies: the mail waits,
never passes for want of an address, never is refused for good over it."""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyd.policydhelp import PolicydProcess, write_config
from tests.support.pki import Pki
from tests.support.postfix import PrivatePostfix, Reply, skip_reason
from tests.support.rulesdb import make_rules_db

pytestmark = pytest.mark.postfix

RULES = """
INSERT INTO inbound_connector (name, on_failure) VALUES ('net-in', 'reject');
INSERT INTO inbound_address VALUES ('net-in', '192.0.2.0/24');
INSERT INTO inbound_connector (name, require_tls, restrict_to_addresses, on_failure) VALUES ('onprem-in', 0, 1, 'reject');
INSERT INTO inbound_domain VALUES ('onprem-in', 'sender', 'onprem.test');
INSERT INTO inbound_address VALUES ('onprem-in', '198.51.100.0/24');
"""


@pytest.fixture(scope="module")
def postfix() -> Iterator[PrivatePostfix]:
    if (reason := skip_reason()) is not None:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="tlsgate-xclient-"))
    instance = PrivatePostfix(Pki(work / "pki"))
    policyd: PolicydProcess | None = None
    try:
        sockdir = instance.queue_dir / "tlsgate"
        sockdir.mkdir(mode=0o755)
        config = write_config(work, make_rules_db(work / "rules.sqlite", RULES), f"unix:{sockdir}/policy.sock")
        policyd = PolicydProcess(config, sockdir / "policy.sock", work / "policyd.log").start()
        instance.start({
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_recipient_restrictions": "reject_unauth_destination, check_policy_service "
            "{ unix:tlsgate/policy.sock, timeout=10s, default_action=DEFER_IF_PERMIT }",
        })
        yield instance
    finally:
        if policyd is not None:
            policyd.stop()
        instance.stop()
        shutil.rmtree(work, ignore_errors=True)


def rcpt_through_xclient(port: int, addr: str, sender: str, rcpt: str) -> Reply:
    """The RCPT reply for a session that XCLIENT says comes from ``addr``, in plaintext."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("proxy.tlsgate.test")
        code, text = client.docmd("XCLIENT", f"ADDR={addr} NAME=[UNAVAILABLE]")
        assert code == 220, (code, text)  # the session starts over, as from that client
        client.ehlo("client.tlsgate.test")
        code, text = client.docmd("MAIL", f"FROM:<{sender}>")
        assert code == 250, (code, text)
        code, text = client.docmd("RCPT", f"TO:<{rcpt}>")
        return Reply(code, text.decode())
    finally:
        client.close()


def test_a_known_address_is_judged_by_its_ranges(postfix: PrivatePostfix) -> None:
    reply = rcpt_through_xclient(postfix.port, "192.0.2.5", "a@other.test", "one@tlsgate.test")
    assert reply.code == 554 and "TLS required by connector net-in" in reply.text, reply
    reply = rcpt_through_xclient(postfix.port, "203.0.113.5", "a@onprem.test", "two@tlsgate.test")
    assert reply.code == 554 and "outside the ranges of connector onprem-in" in reply.text, reply


@pytest.mark.parametrize(("sender", "connector"), [("a@other.test", "net-in"), ("a@onprem.test", "onprem-in")])
def test_an_unknown_address_waits_where_a_range_could_apply(postfix: PrivatePostfix, sender: str,
                                                            connector: str) -> None:
    # Before: net-in's range could not meet an unknown address, and plaintext mail passed it;
    # onprem-in refused its partner for good, over an address nobody knew.
    reply = rcpt_through_xclient(postfix.port, "[UNAVAILABLE]", sender, "three@tlsgate.test")
    assert reply.code == 450 and reply.text.startswith("4.7.1"), reply
    assert f"the client address is unknown, so whether connector {connector} applies" in reply.text
