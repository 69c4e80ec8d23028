//! Well-known ports whose server speaks first, for the warning `check` and the start log
//! give when such a server sits behind a client-first listener: there every connection
//! waits for a client byte that the client, waiting for the greeting, never sends, and
//! times out at `timeouts.first_byte`.
//!
//! Only protocols whose server greets in clear on connect are listed. Their implicit-TLS
//! ports (SMTPS 465, IMAPS 993, POP3S 995, FTPS 990) are client-first on the wire: the
//! client's ClientHello comes before any greeting, so a client-first listener is right
//! there. SSH (22) is left out too: both sides send their banner at once, so the client's
//! byte comes without waiting.

use super::{Config, ListenerConfig, Protocol};

/// The protocol a server on `port` usually speaks, when it speaks first.
fn protocol(port: u16) -> Option<&'static str> {
    Some(match port {
        21 => "FTP",
        25 => "SMTP",
        110 => "POP3",
        119 => "NNTP",
        143 => "IMAP",
        587 => "SMTP submission",
        3306 => "MySQL/MariaDB",
        4190 => "ManageSieve",
        4222 => "NATS",
        5900 => "VNC (RFB)",
        _ => return None,
    })
}

/// One line per client-first listener with a server on such a port: the listener, the
/// first such server, the protocol and the fix.
pub(super) fn warnings(config: &Config) -> Vec<String> {
    config
        .listeners
        .iter()
        .filter_map(|l| warning(config, l))
        .collect()
}

fn warning(config: &Config, l: &ListenerConfig) -> Option<String> {
    if l.protocol != Protocol::ClientFirst {
        return None;
    }
    let mut found = (config.pool(&l.backend)?.servers.iter())
        .filter_map(|s| Some((s, protocol(s.addr.port())?)));
    let (server, proto) = found.next()?;
    let more = match found.count() {
        0 => String::new(),
        n => format!(" (and {n} more server(s) on such ports)"),
    };
    Some(format!(
        "listener {:?} is client-first but its server {:?}{more} is on the {proto} port, whose \
         server speaks first: each connection would wait for a client byte that never comes \
         and time out at timeouts.first_byte; set protocol = \"server-first\" on the listener",
        l.name,
        server.addr.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_text_greeters_are_listed_and_their_tls_ports_are_not() {
        assert_eq!(protocol(3306), Some("MySQL/MariaDB"));
        assert_eq!(protocol(25), Some("SMTP"));
        for tls_first in [465, 993, 995, 990, 443, 5432, 6379, 22] {
            assert_eq!(protocol(tls_first), None, "port {tls_first}");
        }
    }
}
