//! Tokens that live 4 s (renewable to 12 s), each replaced in the token file before its end, as a
//! Vault agent does: kleidi renews each one and moves to the next without one failed call.

use std::time::Duration;

use kleidi_harness::runtime::TokenLease;
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    let short = || {
        Fault::NewToken(TokenLease::Ttl {
            ttl: Duration::from_secs(4),
            max: Duration::from_secs(12),
        })
    };
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![at(1.0, short()), at(9.0, short()), at(17.0, short())],
        length: Duration::from_secs(24),
        ..Scenario::new(
            "short_token_ttl",
            "4 s tokens renewed and replaced across the run (timing ÷10)",
        )
    }
}
