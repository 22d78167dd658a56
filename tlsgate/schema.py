"""The SQL schema of connector rules, declared once for SQLite, PostgreSQL and MariaDB.

Tables are made for hand-written SQL: child rows name their connector (natural keys, with
ON UPDATE/ON DELETE CASCADE), every enumeration has a CHECK constraint, and every default is
the safe one. A single-row ``rules_generation`` counter is bumped by triggers on every rule
table, so a daemon learns of any change, however it was made, with one cheap query.
``sql/<dialect>.sql`` is generated from this module by ``tlsgate db schema``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
    text,
    true,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 1

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

#: MariaDB tables compare text byte for byte, as PostgreSQL and SQLite do (see schema_statements)
MARIADB_COLLATION = "utf8mb4_bin"

# Long text: TEXT everywhere, but MariaDB's TEXT holds only 64 KiB; a PEM chain can be longer.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


MODES = ("enforce", "monitor")
CERT_REQUIREMENTS = ("none", "trusted", "pinned")
FAIL_ACTIONS = ("reject", "defer")
SCOPES = ("sender", "recipient", "header_from")
NAME_FIELDS = ("subject", "issuer")
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
TLS_LEVELS = ("encrypt", "verify", "secure", "fingerprint", "dane", "dane-only")
#: inbound_connector columns only a pinned certificate can satisfy (Postfix reports none of
#: them for a session), with what each asks of the certificate
PIN_ONLY = {"require_organization": "organization", "require_unit": "organizational unit", "min_key_bits": "key size"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _connector_fk(parent: str) -> ForeignKeyConstraint:
    return ForeignKeyConstraint(
        ["connector"], [f"{parent}.name"], onupdate="CASCADE", ondelete="CASCADE"
    )


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class RulesGeneration(Base):
    """One row whose counter the triggers bump on every change to a rule table."""

    __tablename__ = "rules_generation"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))


class InboundConnector(Base):
    __tablename__ = "inbound_connector"
    __table_args__ = (
        CheckConstraint("length(name) BETWEEN 1 AND 64", name="name_length"),
        CheckConstraint(_in("mode", MODES), name="mode"),
        CheckConstraint(_in("certificate", CERT_REQUIREMENTS), name="certificate"),
        CheckConstraint(_in("on_failure", FAIL_ACTIONS), name="on_failure"),
        CheckConstraint(
            "min_tls_version IS NULL OR " + _in("min_tls_version", TLS_VERSIONS),
            name="min_tls_version",
        ),
        CheckConstraint("min_cipher_bits >= 0", name="min_cipher_bits"),
        CheckConstraint("min_key_bits IS NULL OR min_key_bits > 0", name="min_key_bits"),
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    mode: Mapped[str] = mapped_column(String(16), nullable=False, server_default="enforce")
    comment: Mapped[str | None] = mapped_column(String(255))
    require_tls: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    min_tls_version: Mapped[str | None] = mapped_column(String(8))
    require_forward_secrecy: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=false()
    )
    min_cipher_bits: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    certificate: Mapped[str] = mapped_column(String(16), nullable=False, server_default="none")
    require_organization: Mapped[str | None] = mapped_column(String(255))
    require_unit: Mapped[str | None] = mapped_column(String(255))
    min_key_bits: Mapped[int | None] = mapped_column(Integer)
    restrict_to_addresses: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=false()
    )
    on_failure: Mapped[str] = mapped_column(String(8), nullable=False, server_default="defer")
    reply_text: Mapped[str | None] = mapped_column(String(255))


class InboundDomain(Base):
    """A domain pattern that scopes an inbound connector (sender, recipient or header From)."""

    __tablename__ = "inbound_domain"
    __table_args__ = (
        _connector_fk("inbound_connector"),
        CheckConstraint(_in("scope", SCOPES), name="scope"),
        Index("ix_inbound_domain_pattern", "pattern"),
    )
    connector: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    pattern: Mapped[str] = mapped_column(String(255), primary_key=True)


class InboundAddress(Base):
    """A client address range (CIDR) of an inbound connector."""

    __tablename__ = "inbound_address"
    __table_args__ = (_connector_fk("inbound_connector"),)
    connector: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255), primary_key=True)


class InboundCertName(Base):
    """A certificate subject or issuer name pattern an inbound connector requires."""

    __tablename__ = "inbound_cert_name"
    __table_args__ = (
        _connector_fk("inbound_connector"),
        CheckConstraint(_in("field", NAME_FIELDS), name="field"),
    )
    connector: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(16), primary_key=True)
    pattern: Mapped[str] = mapped_column(String(255), primary_key=True)


class InboundCertificate(Base):
    """A registered partner certificate. Only ``connector`` and ``pem`` are required: the
    other columns are derived from the PEM by ``tlsgate cert add`` or at load time."""

    __tablename__ = "inbound_certificate"
    __table_args__ = (
        _connector_fk("inbound_connector"),
        Index("ix_inbound_certificate_connector", "connector"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    connector: Mapped[str] = mapped_column(String(64), nullable=False)
    pem: Mapped[str] = mapped_column(LongText, nullable=False)
    cert_sha256: Mapped[str | None] = mapped_column(String(95))
    pubkey_sha256: Mapped[str | None] = mapped_column(String(95))
    subject_cn: Mapped[str | None] = mapped_column(String(255))
    organization: Mapped[str | None] = mapped_column(String(255))
    unit: Mapped[str | None] = mapped_column(String(255))
    issuer_cn: Mapped[str | None] = mapped_column(String(255))
    key_type: Mapped[str | None] = mapped_column(String(16))
    key_bits: Mapped[int | None] = mapped_column(Integer)
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    not_after: Mapped[datetime | None] = mapped_column(DateTime)
    comment: Mapped[str | None] = mapped_column(String(255))


class OutboundConnector(Base):
    __tablename__ = "outbound_connector"
    __table_args__ = (
        CheckConstraint("length(name) BETWEEN 1 AND 64", name="name_length"),
        CheckConstraint(_in("tls_level", TLS_LEVELS), name="tls_level"),
        CheckConstraint(
            "min_tls_version IS NULL OR " + _in("min_tls_version", TLS_VERSIONS),
            name="min_tls_version",
        ),
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=true())
    comment: Mapped[str | None] = mapped_column(String(255))
    tls_level: Mapped[str] = mapped_column(String(16), nullable=False, server_default="secure")
    min_tls_version: Mapped[str | None] = mapped_column(String(8))


class OutboundDomain(Base):
    __tablename__ = "outbound_domain"
    __table_args__ = (
        _connector_fk("outbound_connector"),
        Index("ix_outbound_domain_pattern", "pattern"),
    )
    connector: Mapped[str] = mapped_column(String(64), primary_key=True)
    pattern: Mapped[str] = mapped_column(String(255), primary_key=True)


class OutboundMatchName(Base):
    """A name the partner's server certificate must match (Postfix's ``match=``)."""

    __tablename__ = "outbound_match_name"
    __table_args__ = (_connector_fk("outbound_connector"),)
    connector: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)


class OutboundSmartHost(Base):
    __tablename__ = "outbound_smart_host"
    __table_args__ = (
        _connector_fk("outbound_connector"),
        CheckConstraint("port BETWEEN 1 AND 65535", name="port"),
    )
    connector: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    port: Mapped[int] = mapped_column(Integer, primary_key=True, server_default=text("25"))
    mx_lookup: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())


RULE_TABLES = (
    "inbound_connector",
    "inbound_domain",
    "inbound_address",
    "inbound_cert_name",
    "inbound_certificate",
    "outbound_connector",
    "outbound_domain",
    "outbound_match_name",
    "outbound_smart_host",
)

BUMP = "UPDATE rules_generation SET generation = generation + 1 WHERE id = 1"
NOTIFY_CHANNEL = "tlsgate_rules"
BUMPED_SETTING = "tlsgate.generation_bumped_in"


def trigger_ddl(dialect: str) -> list[str]:
    """The statements that keep ``rules_generation`` current, for one dialect."""
    out: list[str] = []
    if dialect == "postgresql":
        # Once per transaction, not once per statement: a bulk load of N rows sent as N
        # statements would otherwise update the one counter row N times in one transaction,
        # and each update walks the growing chain of that row's versions (quadratic). The
        # marker is a transaction-local setting, so a rolled-back savepoint forgets it along
        # with the bump it made.
        out.append(
            "CREATE OR REPLACE FUNCTION tlsgate_bump_generation() RETURNS trigger "
            "LANGUAGE plpgsql AS $$\n"
            "DECLARE\n  tx text := txid_current()::text;\n"
            "BEGIN\n"
            f"  IF current_setting('{BUMPED_SETTING}', true) IS DISTINCT FROM tx THEN\n"
            f"    {BUMP};\n"
            f"    PERFORM set_config('{BUMPED_SETTING}', tx, true);\n"
            f"    PERFORM pg_notify('{NOTIFY_CHANNEL}', '');\n"
            "  END IF;\n"
            "  RETURN NULL;\nEND\n$$"
        )
        for table in RULE_TABLES:
            out.append(
                f"CREATE TRIGGER trg_{table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION tlsgate_bump_generation()"
            )
        return out
    for table in RULE_TABLES:
        for op, tag in (("INSERT", "ins"), ("UPDATE", "upd"), ("DELETE", "del")):
            if dialect == "sqlite":
                out.append(
                    f"CREATE TRIGGER trg_{table}_{tag} AFTER {op} ON {table} "
                    f"BEGIN {BUMP}; END"
                )
            else:
                out.append(
                    f"CREATE TRIGGER trg_{table}_{tag} AFTER {op} ON {table} FOR EACH ROW {BUMP}"
                )
    return out


def seed_rows() -> list[str]:
    return [
        f"INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION})",
        "INSERT INTO rules_generation (id, generation) VALUES (1, 0)",
    ]

