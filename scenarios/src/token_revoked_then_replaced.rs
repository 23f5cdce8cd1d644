//! kleidi's OpenBao token revoked, and 8 s later a new one written to its token file: calls are
//! denied meanwhile (never a crash, never a loop of retries), and the new file is picked up without
//! a restart.

use std::time::Duration;

use kleidi_harness::runtime::TokenLease;
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    let hour = TokenLease::Ttl {
        ttl: Duration::from_secs(3600),
        max: Duration::from_secs(24 * 3600),
    };
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![at(4.0, Fault::RevokeToken), at(12.0, Fault::NewToken(hour))],
        length: Duration::from_secs(20),
        ..Scenario::new(
            "token_revoked_then_replaced",
            "token revoked, then a new token file (timing ÷10)",
        )
    }
}
