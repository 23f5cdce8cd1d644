//! Process-wide settings applied before anything reads a credential: no core dumps (a core file of
//! kleidi would hold whatever was in memory when it crashed: PINs, tokens, seeds in flight), and a
//! bound on malloc's arenas for `serve`.

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

/// The value `serve` runs with unless the operator set `MALLOC_ARENA_MAX` (BENCHMARKS.md, Memory).
pub const MALLOC_ARENA_MAX: &str = "2";

/// glibc's malloc gives threads arenas of their own (up to 8 per core) and keeps what is freed in
/// each, so RSS crept up by ~0.1 MiB per load run though nothing leaked (BENCHMARKS.md, Memory).
/// `MALLOC_ARENA_MAX` bounds them, but glibc reads it only at the first allocation, before `main`:
/// so `serve` executes itself again, same pid and arguments, with it set — once, since the new
/// image finds it set. An operator's own value (any, even empty) is kept. Where the exec fails,
/// says so in a warning and serves on as it is. Ignored by other C libraries.
pub fn bound_malloc_arenas() {
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            tracing::warn!(error = %err, "cannot find kleidi's own executable to set MALLOC_ARENA_MAX; RSS may grow under load");
            return;
        }
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(&exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    // Only returns on failure.
    let err = command
        .args(args)
        .env("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)
        .exec();
    tracing::warn!(error = %err, exe = %exe.display(), "cannot execute kleidi again with MALLOC_ARENA_MAX set; RSS may grow under load");
}
