-- tlsgate example connectors: each scenario of "How Exchange Online uses TLS" as rows.
-- Plain SQL that runs unchanged on SQLite, PostgreSQL and MariaDB, after the schema
-- (sql/<dialect>.sql, or `tlsgate db init`). `tlsgate db init --examples sql/examples.sql`
-- loads it; `tlsgate explain` shows how each row judges a session.

-- 1. Opportunistic TLS is the default: mail that matches no connector is accepted whether
--    or not the client used TLS. No row is needed.

-- 2. Forced TLS with a trusted partner: mail from contoso.com must arrive over TLS 1.2 or
--    newer with forward secrecy, otherwise it is refused for good.
INSERT INTO inbound_connector (name, comment, require_tls, min_tls_version, require_forward_secrecy, on_failure)
VALUES ('contoso-in', 'Forced TLS from our partner Contoso', TRUE, 'TLSv1.2', TRUE, 'reject');
INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('contoso-in', 'sender', 'contoso.com');
INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('contoso-in', 'sender', '*.contoso.com');

-- 3. A partner whose certificate name and issuer are required: Fabrikam's servers must
--    present a certificate that chains to a CA we trust (smtpd_tls_CAfile), whose name is
--    mail.fabrikam.com or any *.mail.fabrikam.com host, issued by their CA.
INSERT INTO inbound_connector (name, comment, require_tls, certificate, on_failure, reply_text)
VALUES ('fabrikam-in', 'Fabrikam: trusted certificate with a known name and issuer', TRUE, 'trusted', 'reject',
        'Fabrikam mail must arrive over TLS with the Fabrikam certificate');
INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('fabrikam-in', 'sender', 'fabrikam.com');
INSERT INTO inbound_cert_name (connector, field, pattern) VALUES ('fabrikam-in', 'subject', 'mail.fabrikam.com');
INSERT INTO inbound_cert_name (connector, field, pattern) VALUES ('fabrikam-in', 'subject', '*.mail.fabrikam.com');
INSERT INTO inbound_cert_name (connector, field, pattern) VALUES ('fabrikam-in', 'issuer', 'Fabrikam Issuing CA*');

-- 4. Hybrid: our on-premises servers send as our own domain example.org from 192.0.2.0/24
--    and 2001:db8:25::/48 only, and identify themselves with the certificate onprem.example.org.
--    Mail claiming to be from example.org that comes from elsewhere is deferred.
INSERT INTO inbound_connector (name, comment, require_tls, certificate, restrict_to_addresses, on_failure)
VALUES ('onprem-in', 'Hybrid: on-premises servers, by address and certificate', TRUE, 'trusted', TRUE, 'defer');
INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('onprem-in', 'sender', 'example.org');
INSERT INTO inbound_address (connector, address) VALUES ('onprem-in', '192.0.2.0/24');
INSERT INTO inbound_address (connector, address) VALUES ('onprem-in', '2001:db8:25::/48');
INSERT INTO inbound_cert_name (connector, field, pattern) VALUES ('onprem-in', 'subject', 'onprem.example.org');

-- 5. A connector being tried out: report what Woodgrove's mail would get, block nothing.
INSERT INTO inbound_connector (name, comment, mode, require_tls, min_tls_version)
VALUES ('woodgrove-in', 'Trial of forced TLS for Woodgrove Bank', 'monitor', TRUE, 'TLSv1.2');
INSERT INTO inbound_domain (connector, scope, pattern) VALUES ('woodgrove-in', 'sender', 'woodgrovebank.com');

-- 6. Outbound forced TLS to a partner: mail to contoso.com leaves only over TLS 1.2 or newer
--    to a server whose certificate verifies and names mail.contoso.com, through their relay.
INSERT INTO outbound_connector (name, comment, tls_level, min_tls_version)
VALUES ('contoso-out', 'Forced TLS to Contoso', 'secure', 'TLSv1.2');
INSERT INTO outbound_domain (connector, pattern) VALUES ('contoso-out', 'contoso.com');
INSERT INTO outbound_match_name (connector, name) VALUES ('contoso-out', 'mail.contoso.com');
INSERT INTO outbound_smart_host (connector, host, port) VALUES ('contoso-out', 'relay.contoso.com', 25);
