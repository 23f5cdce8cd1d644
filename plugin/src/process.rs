//! Process-wide hardening applied before anything reads a credential: no core dumps. A core file
//! of kleidi would hold whatever was in memory when it crashed: PINs, tokens, seeds in flight.

use nix::sys::resource::{Resource, setrlimit};

/// Sets the core file size limit to 0 (soft and hard, so the process cannot raise it again) and
/// marks the process not dumpable (no core file even where a core pattern pipes to a handler, and
/// no ptrace attach or /proc/PID/mem reads by other processes of the same user). Where the OS
/// refuses either, says so in a warning and goes on: this is defence in depth, not a precondition.
pub fn forbid_core_dumps() {
    if let Err(err) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!(error = %err, "cannot set RLIMIT_CORE to 0; a crash may write a core file");
    }
    if let Err(err) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %err, "cannot clear the dumpable flag; a crash may write a core file");
    }
}
